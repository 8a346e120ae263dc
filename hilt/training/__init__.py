"""Training: ``hilt train``, ``hilt npt-train``, ``hilt ablate``. One job per file:

- ``loop.py``: ``train()``, read top to bottom: set-up, the loop, the end
- ``config.py``: ``TrainConfig``, its validation and JSON; the model config a run asks for
- ``cli.py``: the ``hilt train`` parser and ``main``
- ``distributed.py``: processes (torchrun), device, dtype, DDP / FSDP2 wrapping, the FSDP2 full-state gather
- ``data.py``: the byte-level corpus, the token cache, the batch sampler, ``encode`` / ``decode``
- ``model.py``: building the model of a run, activation checkpointing
- ``schedule.py``: AdamW, warmup + cosine LR, the HILT modulation-scale schedule
- ``step.py``: one optimisation step (micro-batches, autocast, scaler, clipping, NaN/inf guard)
- ``evaluate.py``: validation loss and bits per byte
- ``checkpoint.py``: the checkpoint folder format, ``load``; ``resume.py``: a run's checkpoints and resuming
- ``logging.py``: the run folder, metrics.csv, TensorBoard, progress bar, loss plot, sample
- ``lformer.py``: the L-Former phases, synthetic reasoning data and head metrics
- ``npt.py``: ``train_npt()`` (``hilt npt-train``); ``ablate.py``: ``hilt ablate``;
  ``variants.py``: its ``--models`` entries (``hilt[ilt_scale_start=1],block[block_size=16]``)
- ``npt_parts.py``: what NPT training on hilt checkpoints and on Hugging Face models shares (curriculum,
  layer weights, config, loss); ``npt_hf.py``: ``train_npt_hf()`` (``hilt npt-train --hf``);
  ``hf_data.py``: the corpus tokenized with a Hugging Face tokenizer, cached

Import the module you need (``from hilt.training.loop import train``); this package imports nothing itself.
"""
