"""Packed binary layers: the "convert" step after `bidm.binarize.binarize_` ("prepare").

A packed layer is the fake-binary layer with only ``binary_op`` replaced. Of the four forward steps
(``docs/CONTRACTS.md``) it keeps ``quantize_input`` (run without autograd) and ``postprocess`` (every real-valued
factor) exactly as the method wrote them, and runs the XNOR/AND-popcount kernel on the bit-packed codes of
``quantize_weight()`` in place of ``F.conv2d`` / ``F.linear``; off the CPU (CUDA), an int8 GEMM of the codes
(`bidm.export.int8_gemm`, weight bits unpacked once per device).

Conversion is in place (`convert_`): the layer's class becomes ``Packed<Class>`` (a subclass of both the method's
class and `PackedBinaryConv2d` / `PackedBinaryLinear`), so the module keeps its identity, its submodules and any
hooks on it or its parents (the TBS wrapper hooks blocks by name). What changes in the state dict:

- ``weight`` (latent FP) -> ``weight_bits``: int64 words of ``quantize_weight()`` (layout `bidm.export.pack.LAYOUT`);
- ``weight_alpha``: ``weight_scale()`` frozen at conversion, for methods whose scale is derived from the latent
  weight (XNOR, BiDM, ReActNet, BBCU, DoReFa); the packed layer's ``weight_scale()`` returns it;
- the tensors in ``merged_into_weight`` (EfficientDM's LoRA factors) are dropped: they are folded into the bits.

XNOR and BiDM convs run a fused forward instead (`bidm.export.fused`: one input pass, the real-valued factors applied
while the kernel writes, channels-last output); ``binary_op`` and the generic path stay for every other layer.

Everything else (FP bias, thresholds, k-convs, shortcut convs and scales, RPReLU, Gamma, step sizes) stays as is.
The latent weight is replaced by a shape-only ``meta`` placeholder (not a parameter or buffer), so code that reads
its shape still works and code that computes from it fails; such a method cannot be packed.
"""

from __future__ import annotations

import torch

from bidm.binarize.core import BinaryConv2d, BinaryLayer, BinaryLinear
from bidm.export import conv1x1, fused, fused_block, int8_gemm, kernels, norm, pack, skip_concat


def off_cpu(a: torch.Tensor) -> bool:
    """Whether ``a`` takes the int8 GEMM path (`bidm.export.int8_gemm`) instead of the CPU popcount kernel."""
    return a.device.type != "cpu"


class PackedLayer:
    """Mixin placed before the method's layer class; see the module docstring."""

    packed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = fused.fused_forward(self, x)
        if fast is not None:
            with torch.no_grad():
                return fast(self, x).to(x.dtype)
        with torch.no_grad():
            a = self.quantize_input(x)
            y = self.binary_op(a).to(x.dtype)
        try:
            return self.postprocess(y, x)
        except (RuntimeError, NotImplementedError) as err:
            if "meta" in str(err):
                raise NotImplementedError(
                    f"binarization method {self.method!r} cannot be packed: its postprocess computes from the "
                    "latent FP weight (only weight_scale() is frozen at export)"
                ) from err
            raise

    def __getstate__(self) -> dict:
        """Pickle / deepcopy state without the fused forward's prepared C calls (ctypes pointers; rebuilt on the
        next forward)."""
        state = self.__dict__.copy()
        state.pop("_fused_constants", None)
        return state

    def quantize_weight(self) -> torch.Tensor:
        """The exact +-1 weight codes, unpacked from ``weight_bits`` (for inspection; not used by the forward)."""
        return self.unpacked_weight().to(self.weight_bits.device)

    def has_weight_alpha(self) -> bool:
        return "weight_alpha" in self._buffers

    def weight_scale(self) -> torch.Tensor:
        if not self.has_weight_alpha():
            raise AttributeError(f"{type(self).__name__} has no weight_scale")
        return self.weight_alpha

    def extra_repr(self) -> str:
        return super().extra_repr() + ", packed"

    def _derived_weight(self, slot: str, device, build):
        """``build()``, cached in ``slot`` until ``weight_bits`` changes (load_state_dict, ...) or ``device`` does."""
        bits = self.weight_bits
        key = (bits.data_ptr(), bits._version, bits.device, device)
        cached = self.__dict__.get(slot)
        if cached is None or cached[0] != key:
            cached = self.__dict__[slot] = (key, build())
        return cached[1]

    def int8_weight(self, device: torch.device) -> torch.Tensor:
        """The int8 code matrix of `bidm.export.int8_gemm` on ``device``."""
        device = torch.device(device)
        return self._derived_weight(
            "_int8_cache", device, lambda: int8_gemm.weight_matrix(self.unpacked_weight(), device)
        )

    def kernel_weight(self) -> kernels.KernelWeight:
        """Kernel-ready weight for the CPU popcount kernel."""
        return self._derived_weight(
            "_kernel_cache", None, lambda: kernels.KernelWeight(self.weight_bits.detach().cpu(), self.cin)
        )


class PackedBinaryConv2d(PackedLayer, BinaryConv2d):
    """Base of packed 2-D convolutions (``Packed<MethodConv2d>`` classes derive from it and the method's class)."""

    @property
    def cin(self) -> int:
        return self.in_channels

    def unpacked_weight(self) -> torch.Tensor:
        return pack.unpack_conv_weight(self.weight_bits.detach().cpu(), self.in_channels)

    def binary_op(self, a: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        if off_cpu(a):  # the popcount kernel is CPU-only: int8 GEMM of the codes elsewhere
            w8 = self.int8_weight(a.device)
            return int8_gemm.conv2d(a, w8, self.out_channels, self.kernel_size, self.stride, self.packed_padding)
        a_words = kernels.pack_activation(a, self.a_code)
        return kernels.binary_conv2d(a_words, self.kernel_weight(), self.stride, self.packed_padding, self.a_code)


class PackedBinaryLinear(PackedLayer, BinaryLinear):
    """Base of packed linear layers; inputs ``[..., Cin]``."""

    @property
    def cin(self) -> int:
        return self.in_features

    def unpacked_weight(self) -> torch.Tensor:
        return pack.unpack_codes(self.weight_bits.detach().cpu(), self.in_features, "pm1")

    def binary_op(self, a: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        if off_cpu(a):
            return int8_gemm.linear(a, self.int8_weight(a.device), self.out_features)
        lead = a.shape[:-1]
        a_words = kernels.pack_activation(a.reshape(-1, a.shape[-1]), self.a_code)
        y = kernels.binary_linear(a_words, self.kernel_weight(), self.a_code)
        return y.reshape(*lead, self.out_features)


_CLASSES: dict[type, type] = {}


def packed_class(cls: type) -> type:
    """``Packed<cls>``: the packed mixin first, then the method's class (cached, one per class)."""
    if cls not in _CLASSES:
        base = PackedBinaryConv2d if issubclass(cls, BinaryConv2d) else PackedBinaryLinear
        _CLASSES[cls] = type(f"Packed{cls.__name__}", (base, cls), {"__module__": __name__, "fake_class": cls})
    return _CLASSES[cls]


def __getattr__(name: str) -> type:
    """Resolve ``Packed<X>`` by name (PEP 562), so pickle / torch.save find the generated classes."""
    if name.startswith("Packed"):
        pending = [BinaryLayer]
        while pending:
            cls = pending.pop()
            if cls.__name__ == name[len("Packed") :] and not issubclass(cls, PackedLayer):
                return packed_class(cls)
            pending += cls.__subclasses__()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _padding(layer: BinaryConv2d) -> tuple[int, int]:
    if layer.padding == "valid":
        return (0, 0)
    if layer.padding == "same":
        if any(k % 2 == 0 for k in layer.kernel_size) or tuple(layer.stride) != (1, 1):
            raise NotImplementedError("packed conv: padding='same' needs odd kernels and stride 1")
        return (layer.kernel_size[0] // 2, layer.kernel_size[1] // 2)
    return tuple(int(p) for p in layer.padding)


def check_packable(layer: BinaryLayer) -> None:
    """Raise NotImplementedError (naming the method) for what the kernel cannot reproduce."""
    why = None
    if layer.a_code not in pack.CODES:
        why = f"activation code {layer.a_code!r} is not one of {pack.CODES}"
    elif isinstance(layer, BinaryConv2d):
        if tuple(layer.dilation) != (1, 1) or layer.groups != 1:
            why = f"dilation {layer.dilation} / groups {layer.groups} are not supported (only 1)"
        elif layer.kernel_size[0] * layer.kernel_size[1] > 64:
            why = f"kernel {layer.kernel_size} has more than 64 taps"
    elif not isinstance(layer, BinaryLinear):
        why = f"{type(layer).__name__} is neither a BinaryConv2d nor a BinaryLinear"
    if why:
        raise NotImplementedError(f"binarization method {layer.method!r} cannot be packed: {why}")


def convert_(layer: BinaryLayer) -> BinaryLayer:
    """Turn one fake-binary layer into its packed form, in place; returns it."""
    if isinstance(layer, PackedLayer):
        return layer
    check_packable(layer)
    with torch.no_grad():
        codes = layer.quantize_weight().detach().cpu()
        alpha = layer.weight_scale().detach().clone() if hasattr(layer, "weight_scale") else None
    try:
        bits = pack.pack_conv_weight(codes) if codes.dim() == 4 else pack.pack_linear_weight(codes)
    except ValueError as err:
        raise NotImplementedError(
            f"binarization method {layer.method!r} cannot be packed: quantize_weight() is not exact +-1 codes"
        ) from err
    padding = _padding(layer) if isinstance(layer, BinaryConv2d) else None
    weight = layer.weight
    layer.__class__ = packed_class(type(layer))
    del layer._parameters["weight"]
    for name in layer.merged_into_weight:
        layer._parameters.pop(name, None)
        layer._buffers.pop(name, None)
    layer.register_buffer("weight_bits", bits.to(weight.device))
    if alpha is not None:
        layer.register_buffer("weight_alpha", alpha)
    layer.__dict__["weight"] = torch.empty(weight.shape, dtype=weight.dtype, device="meta")  # shape only
    if padding is not None:
        layer.packed_padding = padding
    return layer


def is_packed(module) -> bool:
    return isinstance(module, PackedLayer)


def _channels_last_input(module: torch.nn.Module, args: tuple):
    x = args[0] if args else None
    if torch.is_tensor(x) and x.dim() == 4 and x.device.type == "cpu" and fused.enabled():
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return None


def pack_(model: torch.nn.Module) -> torch.nn.Module:
    """Convert every binarized layer of ``model`` (or ``model`` itself) to its packed form, in place.

    When some layer takes a fused forward (it writes channels last), the FP ``nn.Conv2d`` layers the model keeps
    (conv_in, 1x1 skips, ...) get a forward pre-hook that reads their input channels last, so the whole network runs
    in one layout: an element-wise op between an NCHW and a channels-last tensor is many times slower than either.
    Its ``nn.GroupNorm`` layers become `bidm.export.norm.PackedGroupNorm` (the compiled channels-last GroupNorm, with
    the SiLU after it fused where the UNet asks through `bidm.unet.norm_silu`), its FP 1x1 convs
    `bidm.export.conv1x1.PackedConv1x1` (a GEMM where that is faster), and the UNet blocks that take a skip
    concatenation read it as a pair instead (`bidm.export.skip_concat`); its ResnetBlocks add their time embedding
    and skip inside the convs' kernels (`bidm.export.fused_block`).
    """
    for module in list(model.modules()):
        if isinstance(module, BinaryLayer) and not isinstance(module, PackedLayer):
            convert_(module)
    if any(getattr(m, "fake_class", None) in fused.FUSED for m in model.modules()):
        for m in model.modules():
            if type(m) is torch.nn.Conv2d and m.in_channels > 1 and not getattr(m, "_bidm_channels_last", False):
                m.register_forward_pre_hook(_channels_last_input)
                m._bidm_channels_last = True
        norm.convert_norms_(model)
        conv1x1.convert_(model)
        skip_concat.convert_(model)
        fused_block.convert_(model)
    return model
