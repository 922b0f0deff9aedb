// Multi-tensor apply without torch: one launch covers many tensors, with all
// metadata passed by value in the kernel's parameter space.
//
// The shape follows apex's csrc/multi_tensor_apply.cuh and PyTorch's
// MultiTensorApply.cuh (one chunk of one tensor per block), with three changes:
//   * the table is sized for the 32 KB parameter limit that CUDA 12.1+ allows on
//     sm_70+ (apex and older PyTorch use 4 KB, which caps a launch at ~320 blocks
//     and underfills an H100's 132 SMs);
//   * every tensor carries its own dtype byte, so a model whose gradients mix
//     fp16, bf16 and fp32 is still one launch;
//   * sizes and offsets are 64-bit (apex's `int n` overflows past 2^31 elements).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace gaccum {

// Kernel parameter budget. 32764 bytes is the documented limit for sm_70+ with
// CUDA >= 12.1; we leave room for the scalar arguments that follow the table.
constexpr int kMaxTensors = 448;
constexpr int kMaxBlocks = 2560;
constexpr int kBlockThreads = 512;
constexpr int64_t kChunkSize = 65536;

enum GradDType : uint8_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct TensorTable {
  const void* grads[kMaxTensors];
  float* masters[kMaxTensors];
  int64_t sizes[kMaxTensors];
  uint8_t dtypes[kMaxTensors];
  uint16_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};

static_assert(sizeof(TensorTable) + 64 <= 32764,
              "TensorTable must fit in the 32 KB kernel parameter space");

}  // namespace gaccum
