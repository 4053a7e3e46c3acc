"""Triton ops, one per file, each with its PyTorch reference and a mode switch (common.py).

    kernels.ops.rms_norm              rms_norm(x, weight, eps, gemma, mode)      Llama w * x^; Gemma (1 + w) * x^
    kernels.ops.rope                  rope(q, k, cos, sin, unsqueeze_dim, mode)  q and k in one kernel
    kernels.ops.swiglu                swiglu(gate, up, inplace_backward, mode)   silu(gate) * up
    kernels.ops.geglu                 geglu(gate, up, approximate, ...)          gelu(gate) * up, tanh | exact
    kernels.ops.linear_cross_entropy  linear_cross_entropy(hidden, weight, targets, softcap, reduction)

Each file holds the Triton kernels (`_<op>_fwd_kernel`, `_<op>_bwd_kernel`), the host launchers
(`<op>_forward`, `<op>_backward`), the autograd Function (`<Op>Function`), the PyTorch reference
(`<op>_reference`) and the public function. The functions are not re-exported here, so that
`kernels.ops.rms_norm` always names the module.
"""
