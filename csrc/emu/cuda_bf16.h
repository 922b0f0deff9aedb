// Host emulation: stands in for the CUDA header of the same name (see gaccum_emu.h).
#pragma once
#include "gaccum_emu.h"
