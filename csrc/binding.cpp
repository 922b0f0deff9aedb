// pybind11 binding of the torch-independent CUDA core. It sees integers only
// (device pointers, sizes, dtype codes, the stream handle), so it builds
// against cuda_runtime.h alone and works with any installed torch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

namespace gaccum {
void launch_unscale_check_accumulate(const std::vector<uintptr_t>& grads,
                                     const std::vector<uintptr_t>& masters,
                                     const std::vector<int64_t>& sizes,
                                     const std::vector<uint8_t>& dtypes, uintptr_t inv_scale,
                                     uintptr_t found_inf, uintptr_t sq_norm, bool overwrite,
                                     bool zero_grad, uintptr_t stream_handle);
int device_count();
}  // namespace gaccum

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "gaccum's fused multi-tensor unscale-check-accumulate CUDA kernel (torch-free).";
  m.def(
      "unscale_check_accumulate",
      [](const std::vector<uintptr_t>& grads, const std::vector<uintptr_t>& masters,
         const std::vector<int64_t>& sizes, const std::vector<uint8_t>& dtypes,
         uintptr_t inv_scale, uintptr_t found_inf, uintptr_t sq_norm, bool overwrite,
         bool zero_grad, uintptr_t stream) {
        if (gaccum::device_count() == 0) {
          throw std::runtime_error(
              "gaccum._C: no CUDA device is visible; the fused kernel needs a GPU "
              "(CPU tensors use the PyTorch fallback)");
        }
        py::gil_scoped_release release;
        gaccum::launch_unscale_check_accumulate(grads, masters, sizes, dtypes, inv_scale,
                                                found_inf, sq_norm, overwrite, zero_grad,
                                                stream);
      },
      py::arg("grads"), py::arg("masters"), py::arg("sizes"), py::arg("dtypes"),
      py::arg("inv_scale"), py::arg("found_inf"), py::arg("sq_norm"), py::arg("overwrite"),
      py::arg("zero_grad"), py::arg("stream"));
  m.def("device_count", &gaccum::device_count,
        "CUDA devices visible to the runtime (0 on a machine without a GPU).");
  m.attr("CHUNK_SIZE") = 65536;
  m.attr("MAX_TENSORS_PER_LAUNCH") = 448;
  m.attr("MAX_BLOCKS_PER_LAUNCH") = 2560;
}
