// Emulator shim (tests/cuda/emulator): every CUDA header maps to hilt_emu.h.
#pragma once
#include "../hilt_emu.h"
