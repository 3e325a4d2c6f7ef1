"""Packed NVFP4 checkpoints, exports that serving engines load, and checkpoint inspection.

* :func:`save_packed` / :func:`load_packed`: the native packed format (4-bit codes, E4M3 block
  scales, FP32 decode global scale), atomic and sharded; ``from_pretrained`` loads it too.
* :func:`export_compressed_tensors`: ``nvfp4-pack-quantized`` for vLLM / transformers.
* :func:`export_modelopt`: NVIDIA ModelOpt NVFP4 for vLLM / TensorRT-LLM / SGLang.
* :func:`calibrate_input_amax`: activation ranges for the exports' input scales.
* :func:`inspect_checkpoint`: a per-layer table of any of these checkpoints.
"""

from .atomic import atomic_directory
from .calibrate import calibrate_input_amax, calibration_batches
from .checksums import checksum_verification
from .errors import CheckpointError
from .export_compressed_tensors import export_compressed_tensors
from .export_modelopt import export_modelopt
from .inspect import inspect_checkpoint
from .load import exclude_packed_from_ddp, load_packed, pack_model, to_trainable
from .packed import save_packed

__all__ = [
    "CheckpointError",
    "atomic_directory",
    "calibrate_input_amax",
    "calibration_batches",
    "checksum_verification",
    "export_compressed_tensors",
    "exclude_packed_from_ddp",
    "export_modelopt",
    "inspect_checkpoint",
    "load_packed",
    "pack_model",
    "save_packed",
    "to_trainable",
]
