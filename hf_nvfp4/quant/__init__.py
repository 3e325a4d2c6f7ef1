"""The quantizer tier: per-layer state and decisions made once, between the recipe and the kernels.

* :mod:`.quantizer`: one quantizer per tensor role (input, weight, output gradient) with
  explicit amax / reduction / encode phases, built once per layer;
* :mod:`.sr`: stochastic-rounding state in device tensors (``[seed, step]``), advanced by
  one custom op per training forward;
* :mod:`.shared`: one quantization of an activation shared by the sibling layers that
  consume it (q/k/v, gate/up).
"""
