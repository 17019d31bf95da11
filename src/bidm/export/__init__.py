"""Packed export of binarized models and the XNOR/AND-popcount runtime.

    from bidm.export import pack_, save_packed, load_packed, export_model
    pack_(model)                                   # fake-binary layers -> packed layers, in place
    save_packed(model, "packed.safetensors", cfg)  # bits + FP tensors + JSON header, no pickle
    model, cfg = load_packed("packed.safetensors")

Modules: `pack` (bit layout, pure functions), `kernels` (compiled kernel + numpy reference twin),
`fused` (the fused XNOR/BiDM conv forwards), `packed_layers` (`PackedBinaryConv2d` / `PackedBinaryLinear`,
`pack_`), `io` (the file format and sizes), `timing` (where a packed forward spends its time).
"""

from bidm.export.io import export_model, is_packed_file, load_packed, read_packed, save_packed, size_report
from bidm.export.kernels import kernel_info
from bidm.export.pack import LAYOUT
from bidm.export.packed_layers import PackedBinaryConv2d, PackedBinaryLinear, PackedLayer, convert_, is_packed, pack_

__all__ = [
    "LAYOUT",
    "PackedBinaryConv2d",
    "PackedBinaryLinear",
    "PackedLayer",
    "convert_",
    "export_model",
    "is_packed",
    "is_packed_file",
    "kernel_info",
    "load_packed",
    "pack_",
    "read_packed",
    "save_packed",
    "size_report",
]
