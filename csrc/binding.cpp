// pybind11 binding of the torch-independent CUDA core. It sees integers only
// (device pointers, sizes, dtype codes, the stream handle), so it builds
// against cuda_runtime.h alone and works with any installed torch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <utility>
#include <vector>

namespace gaccum {
void launch_unscale_check_accumulate(const std::vector<uintptr_t>& grads,
                                     const std::vector<uintptr_t>& masters,
                                     const std::vector<int64_t>& sizes,
                                     const std::vector<uint8_t>& dtypes, uintptr_t inv_scale,
                                     uintptr_t found_inf, uintptr_t sq_norm, bool overwrite,
                                     bool zero_grad, uintptr_t stream_handle);
void launch_tables(const uintptr_t* grads, const uintptr_t* masters, const int64_t* sizes,
                   const uint8_t* dtypes, size_t count, uintptr_t inv_scale, uintptr_t found_inf,
                   uintptr_t sq_norm, bool overwrite, bool zero_grad, uintptr_t stream_handle);
int device_count();

// The hot path's direct entry (gaccum.master.MasterGrads): one parameter set's masters, their sizes and
// gradient dtypes registered once, validated once in Python; a launch then names tensors by index and
// passes only the gradients' pointers. No per-call validation, no custom-op dispatch.
class MasterSet {
 public:
  MasterSet(std::vector<uintptr_t> masters, std::vector<int64_t> sizes, std::vector<uint8_t> dtypes,
            uintptr_t inv_scale, uintptr_t found_inf)
      : masters_(std::move(masters)), sizes_(std::move(sizes)), dtypes_(std::move(dtypes)),
        inv_scale_(inv_scale), found_inf_(found_inf) {
    if (sizes_.size() != masters_.size() || dtypes_.size() != masters_.size())
      throw std::invalid_argument("gaccum: masters, sizes and dtypes differ in length");
    if (device_count() == 0)
      throw std::runtime_error("gaccum._C: no CUDA device is visible; the fused kernel needs a GPU");
  }
  void launch(const std::vector<int64_t>& index, const std::vector<uintptr_t>& grads, bool overwrite,
              uintptr_t stream) {
    const size_t n = index.size();
    if (grads.size() != n) throw std::invalid_argument("gaccum: one gradient pointer per index");
    m_.resize(n);
    s_.resize(n);
    d_.resize(n);
    for (size_t k = 0; k < n; ++k) {
      const int64_t i = index[k];
      if (i < 0 || static_cast<size_t>(i) >= masters_.size())
        throw std::out_of_range("gaccum: a tensor index outside the registered set");
      m_[k] = masters_[i];
      s_[k] = sizes_[i];
      d_[k] = dtypes_[i];
    }
    launch_tables(grads.data(), m_.data(), s_.data(), d_.data(), n, inv_scale_, found_inf_, 0, overwrite,
                  false, stream);
  }
  size_t size() const { return masters_.size(); }

 private:
  std::vector<uintptr_t> masters_;
  std::vector<int64_t> sizes_;
  std::vector<uint8_t> dtypes_;
  uintptr_t inv_scale_, found_inf_;
  std::vector<uintptr_t> m_;  // scratch reused across launches
  std::vector<int64_t> s_;
  std::vector<uint8_t> d_;
};
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
  // module_local: the emulated build (gaccum._hostemu) defines the same C++ type in a second module
  py::class_<gaccum::MasterSet>(m, "MasterSet", py::module_local())
      .def(py::init<std::vector<uintptr_t>, std::vector<int64_t>, std::vector<uint8_t>, uintptr_t, uintptr_t>(),
           py::arg("masters"), py::arg("sizes"), py::arg("dtypes"), py::arg("inv_scale"), py::arg("found_inf"))
      .def(
          "launch",
          [](gaccum::MasterSet& self, const std::vector<int64_t>& index, const std::vector<uintptr_t>& grads,
             bool overwrite, uintptr_t stream) {
            // Converted while the GIL is held; the launch itself runs without it.
            py::gil_scoped_release release;
            self.launch(index, grads, overwrite, stream);
          },
          py::arg("index"), py::arg("grads"), py::arg("overwrite"), py::arg("stream"))
      .def("__len__", &gaccum::MasterSet::size);
  m.def("device_count", &gaccum::device_count,
        "CUDA devices visible to the runtime (0 on a machine without a GPU).");
  m.attr("CHUNK_SIZE") = 65536;
  m.attr("MAX_TENSORS_PER_LAUNCH") = 448;
  m.attr("MAX_BLOCKS_PER_LAUNCH") = 2560;
}
