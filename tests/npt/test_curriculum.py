"""Curriculum strings, stage boundaries, ratios at every step, layer weights."""
from __future__ import annotations

import pytest

from hilt.training.npt import CurriculumError, Stage, parse_curriculum, parse_layer_weights, stage_at


def test_parse_good_string():
    st = parse_curriculum("teacher:5, mixed:3:0.3 ,mixed:2:0.7:0.2,student:4")
    assert st == [Stage("teacher", 5, 0.0, 0.0, 0), Stage("mixed", 3, 0.3, 0.3, 5),
                  Stage("mixed", 2, 0.7, 0.2, 8), Stage("student", 4, 1.0, 1.0, 10)]
    assert st[-1].end == 14


def test_defaults_and_explicit_mlp_ratio():
    assert parse_curriculum("mixed:4") == [Stage("mixed", 4, 0.5, 0.5, 0)]
    assert parse_curriculum("teacher:3:0:1") == [Stage("teacher", 3, 0.0, 1.0, 0)]
    assert parse_curriculum("student:2:1:0.5") == [Stage("student", 2, 1.0, 0.5, 0)]
    assert parse_curriculum("TEACHER:1") == [Stage("teacher", 1, 0.0, 0.0, 0)]


def test_stage_boundaries_and_ratio_at_every_step():
    st = parse_curriculum("teacher:2,mixed:3:0.25:0.75,student:2")
    got = [(stage_at(st, s).name, stage_at(st, s).attn_ratio, stage_at(st, s).mlp_ratio) for s in range(7)]
    assert got == [("teacher", 0.0, 0.0)] * 2 + [("mixed", 0.25, 0.75)] * 3 + [("student", 1.0, 1.0)] * 2
    assert stage_at(st, 100).name == "student"  # past the end: the last stage
    with pytest.raises(ValueError):
        stage_at(st, -1)


@pytest.mark.parametrize("spec, part", [
    ("", "empty"),
    ("teacher", "part 1 'teacher'"),
    ("teacher:0", "steps '0'"),
    ("teacher:-3", "steps '-3'"),
    ("teacher:abc", "steps 'abc'"),
    ("teacher:2.5", "steps '2.5'"),
    ("teacher:5,warmup:10", "unknown stage 'warmup'"),
    ("teacher:5,mixed:10:1.5", "part 2 'mixed:10:1.5': attn_ratio '1.5'"),
    ("mixed:10:x", "attn_ratio 'x' is not a number"),
    ("mixed:10:0.5:nan", "mlp_ratio 'nan'"),
    ("mixed:10:0.5:-0.1", "mlp_ratio '-0.1'"),
    ("teacher:10:0.5", "a teacher stage has attn_ratio 0"),
    ("student:10:0.3", "a student stage has attn_ratio 1"),
    ("teacher:10,,student:5", "part 2 is empty"),
    ("mixed:1:0.2:0.3:0.4", "part 1 'mixed:1:0.2:0.3:0.4'"),
])
def test_bad_strings_name_the_bad_part(spec, part):
    with pytest.raises(CurriculumError) as e:
        parse_curriculum(spec)
    assert part in str(e.value)


def test_layer_weights():
    assert parse_layer_weights("uniform", 3) == [1.0, 1.0, 1.0]
    assert parse_layer_weights("linear", 4) == [1.0, 0.75, 0.5, 0.25]
    assert parse_layer_weights(" Linear ", 1) == [1.0]
    assert parse_layer_weights("1.0,0.9, 0.8,0", 4) == [1.0, 0.9, 0.8, 0.0]


@pytest.mark.parametrize("spec, n, msg", [
    ("1,2", 3, "3 comma-separated numbers"),
    ("1,a,2", 3, "'a' is not a number"),
    ("1,-1", 2, "'-1' must be a finite number >= 0"),
    ("0,0", 2, "at least one must be > 0"),
    ("cubic", 2, "expected 'uniform', 'linear'"),
])
def test_bad_layer_weights(spec, n, msg):
    with pytest.raises(CurriculumError) as e:
        parse_layer_weights(spec, n)
    assert msg in str(e.value)
