// df_mlx._kernels: the native recurrences (GRU, selective scan), depthwise and grouped
// convolutions, the deep filter, tanh, sigmoid, softmax, per-channel affine maps and dense
// products as functions on mx.array (nanobind, domain "mlx", so that mlx.core's array type is
// shared).
#include <nanobind/nanobind.h>
#include <nanobind/stl/array.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "activation.h"
#include "blas.h"
#include "channel_affine.h"
#include "deep_filter.h"
#include "depthwise_conv.h"
#include "grouped_conv.h"
#include "gru.h"
#include "matmul.h"
#include "selective_scan.h"
#include "softmax.h"

namespace nb = nanobind;

#define DFMLX_STR(x) #x
#define DFMLX_VERSION_STR(a, b, c) DFMLX_STR(a) "." DFMLX_STR(b) "." DFMLX_STR(c)

NB_MODULE(_kernels, m) {
  m.doc() = "df_mlx's native MLX primitives (CPU)";
  // the mlx these headers belong to; df_mlx._native.py compares it with the one running
  m.attr("mlx_version") = DFMLX_VERSION_STR(MLX_VERSION_MAJOR, MLX_VERSION_MINOR, MLX_VERSION_PATCH);
  m.def("gru_scan", &dfmlx::gru_scan, nb::arg("xp"), nb::arg("h0"), nb::arg("w_hh"),
        nb::arg("b_hh"), nb::arg("reverse") = false,
        "torch's GRU recurrence over axis 0 of xp [T, B, 3H]: [outputs [T, B, H], h_n [B, H]]");
  m.def("selective_scan", &dfmlx::selective_scan, nb::arg("x"), nb::arg("delta"), nb::arg("a"),
        nb::arg("b"), nb::arg("c"), nb::arg("h0"),
        "Mamba's selective scan over x, delta [B, L, D]: [y [B, L, D], h_L [B, D, N]]");
  m.def("deep_filter", &dfmlx::deep_filter, nb::arg("spec"), nb::arg("coefs"), nb::arg("frame_size"),
        nb::arg("before"), nb::arg("conj") = false,
        "Deep filter of spec [B, C, T, F, 2] with coefs [B, C*N, T, F', 2] over frames t - before .. "
        "t - before + N - 1; bins from F' on pass through");
  m.def("depthwise_conv2d", &dfmlx::depthwise_conv2d, nb::arg("x"), nb::arg("w"), nb::arg("geometry"),
        nb::arg("flip") = false,
        "Depthwise conv of x [B, H, W, C] with w [C, kh, kw, 1] (flip: the kernel reversed in both "
        "axes); geometry (kh, kw, sh, sw, dh, dw, uh, uw, top, bottom, left, right): u input dilation, "
        "then padding");
  m.def("grouped_conv2d", &dfmlx::grouped_conv2d, nb::arg("x"), nb::arg("w"), nb::arg("geometry"),
        nb::arg("groups"),
        "Grouped conv of x [B, H, W, C] with w [O, kh, kw, C/groups]; geometry (kh, kw, sh, sw, dh, "
        "dw, top, bottom, left, right)");
  m.def("matmul", &dfmlx::matmul, nb::arg("a"), nb::arg("b"),
        "a [M, K] @ b [K, N], or a [G, M, K] @ b [G, K, N], on the bound BLAS (float32, CPU)");
  m.def("linear", &dfmlx::linear, nb::arg("x"), nb::arg("w"),
        "x [..., K] @ w.T for a weight w [N, K] or [N, ...] of K (torch's F.linear without bias), on the bound BLAS");
  m.def("activation", &dfmlx::activation, nb::arg("x"), nb::arg("kind"),
        "tanh (kind 0) or sigmoid (kind 1) elementwise (float32, CPU)");
  m.def("channel_affine", &dfmlx::channel_affine, nb::arg("x"), nb::arg("scale"), nb::arg("shift"),
        nb::arg("relu") = false,
        "x [..., C] * scale [C] + shift [C], with relu then max(., 0) (float32, CPU)");
  m.def("softmax", &dfmlx::softmax, nb::arg("x"), "Softmax over the last axis (float32, CPU)");
  m.def("bind_blas", &dfmlx::bind_blas, nb::arg("path"), nb::arg("prefix") = "",
        "Bind {prefix}cblas_sgemv/sgemm from a shared library; returns '' or why not");
  m.def("blas_library", &dfmlx::blas_library, "The file the bound sgemv comes from");
}
