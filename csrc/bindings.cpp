// Registers the CUDA kernels as torch ops in the namespace dlcv_fast_cuda (CUDA dispatch key only), and gives
// Python a module to import: `import dlcv_fast._C` runs the registrations. The public, differentiable ops
// (dlcv_fast::rope, dlcv_fast::window_attention_fwd, ...) are defined in dlcv_fast/ops and call these for
// backend "cuda".
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(dlcv_fast_cuda, m) {
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_bias, Tensor? key_padding_mask, bool causal, "
      "int prefix_len, float scale, Tensor? rope_cos=None, Tensor? rope_sin=None) -> (Tensor, Tensor)");
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? attn_bias, "
      "Tensor? key_padding_mask, bool causal, int prefix_len, float scale, bool bias_grad, Tensor? rope_cos=None, "
      "Tensor? rope_sin=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("rope(Tensor x, Tensor cos, Tensor sin, Tensor(a!) out, bool interleaved, float sin_sign) -> ()");
  m.def(
      "window_attention_fwd(Tensor qkv, Tensor? table, Tensor? qkv_bias, int num_heads, int window_h, "
      "int window_w, int shift_h, int shift_w, float scale) -> (Tensor, Tensor)");
  m.def(
      "window_attention_bwd(Tensor dout, Tensor qkv, Tensor? table, Tensor? qkv_bias, Tensor lse, int num_heads, "
      "int window_h, int window_w, int shift_h, int shift_w, float scale, bool table_grad, bool pad_bias_grad) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dlcv_fast_cuda, CUDA, m) {
  m.impl("attention_fwd", &dlcv_fast::attention_fwd_cuda);
  m.impl("attention_bwd", &dlcv_fast::attention_bwd_cuda);
  m.impl("rope", &dlcv_fast::rope_cuda);
  m.impl("window_attention_fwd", &dlcv_fast::window_attention_fwd_cuda);
  m.impl("window_attention_bwd", &dlcv_fast::window_attention_bwd_cuda);
}

static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                 "dlcv_fast's CUDA kernels (ops under torch.ops.dlcv_fast_cuda)", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
