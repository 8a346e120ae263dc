"""CPU emulation of the csrc/ CUDA kernels for sanitizer tests (see hilt_emu.h)."""
