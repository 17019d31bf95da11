"""The binary conv2d / linear runtime: a compiled XNOR/AND-popcount kernel and its numpy reference twin.

Build: ``bidm/csrc/bitgemm.c`` (and ``groupnorm.c``, see `bidm.export.norm`) is plain C11 with no Python or torch
headers. At first use it is compiled with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``) into
``$BIDM_CACHE_DIR`` (default ``$XDG_CACHE_HOME/bidm`` or ``~/.cache/bidm``; a temp dir when that is not writable)
under a name hashed from the sources, flags, compiler version and CPU, and loaded with ctypes. Flags: ``-O3 -shared
-fPIC``, plus ``-fopenmp`` (dropped if the compiler lacks OpenMP) and, on x86-64 CPUs that report them, ``-mavx2
-mpopcnt`` and ``-mavx512f -mavx512vpopcntdq`` (the micro-kernel then counts 8 words per ``vpopcntq``;
``BIDM_CFLAGS=-mno-avx512f`` keeps the AVX2 nibble-LUT kernel, ``-mno-avx2 -mno-avx512f`` the scalar one). Why not
``torch.utils.cpp_extension``: it needs ninja and torch's C++ headers, takes ~1 min to compile and ties the
artefact to the torch ABI; this build takes about a second and works with any torch.

Where no compiler works, every call runs the reference twin (numpy, same layout, same integer results) and one
warning says so. ``BIDM_KERNEL=ref`` forces the reference; ``BIDM_KERNEL=c`` makes a failed build an error.

Both backends return float32 tensors holding the exact integer dot products of the binary codes, with zero padding
of the binarized input (padded taps contribute 0); see the layout in `bidm.export.pack`. Two fused passes serve the
XNOR/BiDM-style layers (`bidm.export.fused`): `pack_input` (threshold + sign + bit-pack + mean_c|x| in one read,
NCHW or channels-last input) and the `Epilogue` of `binary_conv2d` (alpha, K map, bias, scaled shortcut applied
while the output is written, NCHW or channels-last output); their reference twins are the same torch operations.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view

from bidm.export import pack

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = (CSRC / "bitgemm.c", CSRC / "groupnorm.c")  # built into one library
ABI_VERSION = 6
PANEL_WIDTH = 8  # NR of bitgemm.c: output channels per weight panel
_MODES = {"pm1": 0, "01": 1}

_state: dict = {"lib": None, "tried": False, "info": {}, "warned": False}


# ---------------------------------------------------------------------------------------------------------------
# Build and load


def cache_dir() -> Path:
    """Where compiled kernels are kept (outside the source tree)."""
    if os.environ.get("BIDM_CACHE_DIR"):
        return Path(os.environ["BIDM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bidm"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    """The CPU's model name and the popcount ISA it offers, e.g. ``Intel(R) Xeon(R) Processor (avx512-vpopcntdq)``."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    flags = _cpu_flags()
    isa = "avx512-vpopcntdq" if {"avx512f", "avx512_vpopcntdq"} <= flags else "avx2" if "avx2" in flags else "no avx2"
    return f"{name} ({isa})"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compile(cc: str, flags: list[str], out: Path) -> str | None:
    """Compile SOURCES to ``out`` atomically; returns an error message or None."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    cmd = [cc, *flags, "-o", str(tmp), *map(str, SOURCES), "-lm"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as err:
        return str(err)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        return (proc.stderr or proc.stdout).strip()[-2000:]
    os.replace(tmp, out)  # atomic: concurrent builders each write their own tmp
    return None


def _build_and_load() -> ctypes.CDLL | None:
    info = _state["info"]
    cc = _compiler()
    if cc is None:
        info["reason"] = "no C compiler found (set CC)"
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    base = ["-O3", "-std=gnu11", "-shared", "-fPIC", "-ffp-contract=off"]  # no FMA: the epilogue matches torch
    cpu = _cpu_flags()
    if platform.machine().lower() in ("x86_64", "amd64") and {"avx2", "popcnt"} <= cpu:
        base += ["-mavx2", "-mpopcnt"]
        if {"avx512f", "avx512_vpopcntdq"} <= cpu:
            base += ["-mavx512f", "-mavx512vpopcntdq"]
    base += os.environ.get("BIDM_CFLAGS", "").split()  # e.g. "-march=native", or "-mno-avx2" for the scalar path
    errors = []
    for flags in (base + ["-fopenmp"], base):
        key = hashlib.sha256(
            "\n".join([*(f.read_text() for f in SOURCES), " ".join(flags), cc, version, platform.machine()]).encode()
        ).hexdigest()[:16]
        for root in (cache_dir(), Path(tempfile.gettempdir()) / f"bidm-{os.getuid() if hasattr(os, 'getuid') else 0}"):
            path = root / f"bitgemm-{key}.so"
            if not path.exists():
                err = _compile(cc, flags, path) if _writable(root) else f"{root} is not writable"
                if err:
                    errors.append(err)
                    continue
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as err:
                errors.append(str(err))
                continue
            if lib.bidm_abi_version() != ABI_VERSION or lib.bidm_panel_width() != PANEL_WIDTH:
                errors.append(f"{path}: ABI {lib.bidm_abi_version()} != {ABI_VERSION}")
                continue
            info.update(path=str(path), compiler=cc, flags=" ".join(flags))
            return lib
    info["reason"] = "compiling bidm/csrc/{bitgemm,groupnorm}.c failed: " + (errors[-1] if errors else "unknown error")
    return None


def _writable(root: Path) -> bool:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(root, os.W_OK)


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.bidm_pack_input.argtypes = [ptr, i64, i64, i64, cint, ptr, cint, ptr, ptr, cint]
    lib.bidm_pack_input.restype = None
    lib.bidm_panel_words.argtypes = [i64, i64]
    lib.bidm_panel_words.restype = i64
    lib.bidm_make_panel.argtypes = [ptr, i64, i64, ptr]
    lib.bidm_make_panel.restype = None
    lib.bidm_conv2d.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, i64, i64]
    lib.bidm_conv2d.argtypes += [cint, ptr, cint, ctypes.POINTER(_CEpilogue)]
    lib.bidm_conv2d.restype = cint
    lib.bidm_group_norm_cat_nhwc.argtypes = [ptr, i64, ptr, i64, i64, i64, i64, ptr, ptr, ctypes.c_float, cint, ptr,
                                             cint, ptr, cint, ptr, ptr]  # fmt: skip
    lib.bidm_group_norm_cat_nhwc.restype = cint
    lib.bidm_set_pixel_major_bytes.argtypes = [i64]
    lib.bidm_set_pixel_major_bytes.restype = i64


def library() -> ctypes.CDLL | None:
    """The compiled kernel library, built on first call; None where it cannot be built (reason in `kernel_info`)."""
    if not _state["tried"]:
        _state["tried"] = True
        lib = _build_and_load()
        if lib is not None:
            _declare(lib)
            _state["info"].update(
                openmp=bool(lib.bidm_has_openmp()),
                avx2=bool(lib.bidm_has_avx2()),
                avx512=bool(lib.bidm_has_avx512()),
                mr=lib.bidm_mr(),
                popcount=("scalar", "avx2-nibble-lut", "avx2-harley-seal", "avx512-vpopcntq")[
                    lib.bidm_popcount_method()
                ],
            )
        _state["lib"] = lib
    return _state["lib"]


def backend(requested: str | None = None) -> str:
    """``"c"`` or ``"ref"``: the argument, else ``$BIDM_KERNEL``, else ``"c"`` when the build works."""
    choice = requested or os.environ.get("BIDM_KERNEL", "auto")
    if choice not in ("auto", "c", "ref"):
        raise ValueError(f"unknown kernel backend {choice!r}; expected 'auto', 'c' or 'ref'")
    if choice == "ref":
        return "ref"
    if library() is not None:
        return "c"
    if choice == "c":
        raise RuntimeError(f"bidm binary kernel unavailable: {_state['info'].get('reason')}")
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(
            f"bidm.export: compiled binary kernel unavailable ({_state['info'].get('reason')}); "
            "using the numpy reference kernel, which is exact but slow",
            RuntimeWarning,
            stacklevel=3,
        )
    return "ref"


def kernel_info() -> dict:
    """Which backend runs and how it was built (path, compiler, flags, openmp, avx2, avx512, micro-kernel rows mr,
    popcount method), or the reason it was not."""
    name = backend()
    return {"backend": name, **_state["info"]}


def switch(name: str) -> bool:
    """A runtime on/off switch from the environment (default on): ``BIDM_FUSED``, ``BIDM_FUSED_NORM``,
    ``BIDM_PREPARED``, ``BIDM_SKIP_CONCAT``, ``BIDM_FUSED_BLOCK``; read at every call, so a process can flip one
    between calls (``bench/ab_step.py``)."""
    value = os.environ.get(name, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}; expected 0 or 1")
    return value == "1"


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if t is None else t.data_ptr())


def is_channels_last(x: torch.Tensor) -> bool:
    """True when ``x`` [B, C, H, W] is stored [B, H, W, C] (and not also plain contiguous, e.g. C = 1 or H = W = 1)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _dense(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``x`` as float32 in NCHW or channels-last order, whichever it is closest to; (tensor, is_nhwc)."""
    x = x.detach().to(torch.float32)
    if is_channels_last(x):
        return x, True
    return x.contiguous(), False


# ---------------------------------------------------------------------------------------------------------------
# Weights


@dataclass
class KernelWeight:
    """A packed binary weight ready for the kernel: words ``[Cout, kh, kw, Wc]`` (layout `pack.LAYOUT`)."""

    words: torch.Tensor
    cin: int
    tapsum: torch.Tensor = field(init=False)  # int32 [kh*kw, Cout rounded up to 8]: Cin - 2 popc(w[o, t])
    panel: torch.Tensor | None = field(init=False, default=None)  # kernel-native interleaving, C backend only

    def __post_init__(self):
        if self.words.dim() == 2:  # linear [Cout, Wc] -> [Cout, 1, 1, Wc]
            self.words = self.words[:, None, None, :]
        self.words = self.words.contiguous()
        sums = pack.tap_sums(self.words, self.cin).T  # [T, Cout]
        self.tapsum = F.pad(sums, (0, -self.cout % PANEL_WIDTH)).contiguous()  # zero columns up to the panel width

    @property
    def cout(self) -> int:
        return self.words.shape[0]

    @property
    def kernel_size(self) -> tuple[int, int]:
        return self.words.shape[1], self.words.shape[2]

    def get_panel(self, lib: ctypes.CDLL) -> torch.Tensor:
        if self.panel is None:
            kw_words = self.words[0].numel()
            panel = torch.empty(lib.bidm_panel_words(self.cout, kw_words), dtype=torch.int64)
            lib.bidm_make_panel(_ptr(self.words), self.cout, kw_words, _ptr(panel))
            self.panel = panel
        return self.panel


# ---------------------------------------------------------------------------------------------------------------
# Public ops


def pack_input(
    x: torch.Tensor,
    shift: torch.Tensor | None = None,
    code: str = "pm1",
    *,
    absmean: bool = False,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused input pass of a binary layer: one read of ``x`` gives its packed codes and mean_c|x|.

    ``x`` [B, C, H, W] (NCHW or channels last) or [B, C]; ``shift`` [C] (the threshold b_c) or None.
    Returns (int64 words ``[B, H, W, Wc]`` / ``[B, Wc]`` of ``code(x + shift)``, float32 ``[B, 1, H, W]`` /
    ``[B, 1]`` mean_c|x| or None). Codes: pm1 bit = (x + shift < 0), 01 bit = (x + shift > 0.5).
    """
    if x.dim() not in (2, 4):
        raise ValueError(f"expected [B, C, H, W] or [B, C] inputs, got {tuple(x.shape)}")
    if backend(impl) == "ref":
        return _reference_pack_input(x, shift, code, absmean)
    return _pack_c(x, shift, code, absmean)


def _pack_c(x, shift, code, absmean):
    lib = library()
    x, nhwc = _dense(x)
    b, c = x.shape[:2]
    hw = x[0, 0].numel()
    spatial = tuple(x.shape[2:])
    words = torch.empty(b, *spatial, pack.num_words(c), dtype=torch.int64)
    mean = torch.empty(b, 1, *spatial, dtype=torch.float32) if absmean else None
    if shift is not None and (shift.dtype != torch.float32 or not shift.is_contiguous()):
        shift = shift.detach().to(torch.float32).contiguous()
    lib.bidm_pack_input(
        _ptr(x), b, c, hw, int(nhwc), _ptr(shift), _MODES[code], _ptr(words), _ptr(mean), torch.get_num_threads()
    )
    return words, mean


def _reference_pack_input(x, shift, code, absmean):
    x = x.detach().to(torch.float32)
    u = x if shift is None else x + (shift.reshape(1, -1, 1, 1) if x.dim() == 4 else shift.reshape(1, -1))
    codes = torch.where(u < 0, -1.0, 1.0) if code == "pm1" else (u > 0.5).float()
    words = pack.pack_codes(codes, code, dim=1) if x.dim() == 2 else pack.pack_codes(codes.permute(0, 2, 3, 1), code)
    return words, (x.abs().mean(dim=1, keepdim=True) if absmean else None)


def pack_activation(a: torch.Tensor, code: str = "pm1", *, impl: str | None = None) -> torch.Tensor:
    """Exact codes ``[B, C, H, W]`` -> int64 ``[B, H, W, Wc]``, or ``[B, C]`` -> ``[B, Wc]`` (channels packed)."""
    if a.dim() not in (2, 4):
        raise ValueError(f"expected [B, C, H, W] or [B, C] codes, got {tuple(a.shape)}")
    if backend(impl) == "ref":
        return pack.pack_codes(a, code, dim=1) if a.dim() == 2 else pack.pack_codes(a.permute(0, 2, 3, 1), code)
    return _pack_c(a, None, code, False)[0]


@dataclass
class Epilogue:
    """Real-valued factors applied while the kernel writes its output, in this float order:

        y[b, o, p] = (((d[b, o, p] * alpha[o]) * K[b, 0, p] + bias[o]) + res_scale * res[b, o, p]) + row_bias[b, o]

    ``d`` = the exact integer dot; ``alpha`` / ``bias`` [Cout], ``res`` [B, Cout, Ho, Wo] (NCHW or channels last),
    ``row_bias`` [B, Cout]; None = factor 1 / term 0. ``row_bias`` is the time-embedding add a UNet ResBlock does
    after its first conv (`bidm.export.fused_block`), in the same order. With ``res_up`` = u > 1, ``res`` is
    [B, Cout, Ho/u, Wo/u] channels last and is read nearest-upsampled (a UNet Upsample conv's identity shortcut,
    `bidm.export.fused.upsampled_conv`). ``K`` is ``kmap`` [B, 1, Ho, Wo] when
    given, else, with ``kmean`` [B, 1, H, W], the 1-channel conv ``k_weight`` [1, 1, kh, kw] (+ ``k_bias``) of
    ``kmean`` with the binary conv's kernel size, stride and zero padding, computed by the kernel per output tile
    (XNOR/BiDM's K map); else 1.
    """

    alpha: torch.Tensor | None = None
    kmap: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    res: torch.Tensor | None = None
    res_scale: float = 1.0
    kmean: torch.Tensor | None = None
    k_weight: torch.Tensor | None = None
    k_bias: float = 0.0
    row_bias: torch.Tensor | None = None
    res_up: int = 1

    def k_map(self, stride, padding) -> torch.Tensor | None:
        if self.kmap is not None or self.kmean is None:
            return self.kmap
        bias = torch.tensor([self.k_bias], dtype=torch.float32)
        return F.conv2d(self.kmean.float(), self.k_weight.float().reshape(1, 1, *self.k_weight.shape[-2:]), bias,
                        stride, padding)  # fmt: skip

    def apply(self, y: torch.Tensor, stride=(1, 1), padding=(0, 0)) -> torch.Tensor:
        """The reference twin: the same float operations on a float32 ``[B, Cout, Ho, Wo]`` of dots."""
        if self.alpha is not None:
            y = y * self.alpha.reshape(1, -1, 1, 1)
        kmap = self.k_map(stride, padding)
        if kmap is not None:
            y = y * kmap
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        if self.res is not None:
            res = self.res if self.res_up == 1 else upsample_nearest(self.res, self.res_up)
            y = y + self.res_scale * res
        if self.row_bias is not None:
            y = y + self.row_bias.reshape(y.shape[0], -1, 1, 1)
        return y


class _CEpilogue(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("alpha", "kmap", "bias", "res", "kmean", "kweight")] + [
        ("res_scale", ctypes.c_float),
        ("kbias", ctypes.c_float),
        ("res_nhwc", ctypes.c_int32),
        ("out_nhwc", ctypes.c_int32),
        ("row_bias", ctypes.c_void_p),
        ("res_up", ctypes.c_int32),
        ("pad_", ctypes.c_int32),
    ]


def _residual(res: torch.Tensor, shape: tuple) -> tuple[torch.Tensor, bool]:
    """The epilogue's residual as float32 NCHW or channels last (`_dense`), checked against the output ``shape``."""
    res, nhwc = _dense(res)
    if tuple(res.shape) != tuple(shape):
        raise ValueError(f"epilogue residual has shape {tuple(res.shape)}, expected {tuple(shape)}")
    return res, nhwc


def _c_epilogue(epi: Epilogue | None, shape: tuple, in_hw: tuple, kernel: tuple, channels_last: bool):
    """The C struct and the float32 tensors it points to (kept alive by the caller)."""
    if epi is None:
        return _CEpilogue(None, None, None, None, None, None, 0.0, 0.0, 0, int(channels_last)), []
    b, cout, ho, wo = shape

    def vec(t, n):
        if t is None:
            return None
        if t.dtype != torch.float32 or not t.is_contiguous():
            t = t.detach().to(torch.float32).contiguous()
        if t.numel() != n:
            raise ValueError(f"epilogue tensor has {t.numel()} values, expected {n}")
        return t

    kmean = vec(epi.kmean, b * in_hw[0] * in_hw[1]) if epi.kmap is None else None
    kweight = vec(epi.k_weight, kernel[0] * kernel[1]) if kmean is not None else None
    alpha, bias, kmap = vec(epi.alpha, cout), vec(epi.bias, cout), vec(epi.kmap, b * ho * wo)
    u = epi.res_up
    res, res_nhwc = (None, False) if epi.res is None else _residual(epi.res, (b, cout, ho // u, wo // u))
    if u > 1 and (res is None or not res_nhwc or ho % u or wo % u):
        raise ValueError(f"res_up={u} needs a channels-last residual and an output size divisible by it")
    row_bias = vec(epi.row_bias, b * cout)
    keep = [alpha, kmap, bias, res, kmean, kweight]
    c = _CEpilogue(*(t.data_ptr() if t is not None else None for t in keep), float(epi.res_scale), float(epi.k_bias),
                   int(res_nhwc), int(channels_last), _ptr(row_bias), int(u))  # fmt: skip
    return c, keep + [row_bias]


def upsample_nearest(t: torch.Tensor, u: int) -> torch.Tensor:
    """``t`` [B, C, H, W] nearest-upsampled by the integer ``u`` in its own memory format (any dtype: float maps
    and int64 packed words [B, H, W, Wc] viewed as [B, Wc, H, W] alike), one copy."""
    b, c, h, w = t.shape
    nhwc = is_channels_last(t)
    src = t.permute(0, 2, 3, 1) if nhwc else t  # [B, H, W, C] or [B, C, H, W] memory
    if nhwc:
        out = src[:, :, None, :, None, :].expand(b, h, u, w, u, c).reshape(b, h * u, w * u, c)
        return out.permute(0, 3, 1, 2)
    return src[:, :, :, None, :, None].expand(b, c, h, u, w, u).reshape(b, c, h * u, w * u)


def conv_output_size(h: int, w: int, kernel_size, stride, padding) -> tuple[int, int]:
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1


def binary_conv2d(
    a_words: torch.Tensor,
    weight: KernelWeight,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    code: str = "pm1",
    *,
    epilogue: Epilogue | None = None,
    channels_last: bool = False,
    impl: str | None = None,
) -> torch.Tensor:
    """``F.conv2d(a, w, stride=stride, padding=padding)`` on codes, from packed ``a`` [B, H, W, Wc] and ``weight``.

    Returns float32 ``[B, Cout, Ho, Wo]`` holding exact integers (padded taps contribute 0), or, with ``epilogue``,
    those passed through it; stored channels last when ``channels_last``.
    """
    b, h, w, wc = a_words.shape
    if wc != weight.words.shape[-1]:
        raise ValueError(f"activation has {wc} words per pixel, weight {weight.words.shape[-1]}")
    ho, wo = conv_output_size(h, w, weight.kernel_size, stride, padding)
    if backend(impl) == "ref":
        out = reference_conv2d(a_words.numpy(), weight.words.numpy(), weight.cin, stride, padding, code)
        y = torch.from_numpy(out.astype(np.float32))
        y = y if epilogue is None else epilogue.apply(y, stride, padding)
        return y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    lib = library()
    (kh, kw), (sh, sw), (ph, pw) = weight.kernel_size, stride, padding
    if channels_last:
        y = torch.empty(b, ho, wo, weight.cout, dtype=torch.float32).permute(0, 3, 1, 2)
    else:
        y = torch.empty(b, weight.cout, ho, wo, dtype=torch.float32)
    epi, _keep = _c_epilogue(epilogue, (b, weight.cout, ho, wo), (h, w), weight.kernel_size, channels_last)
    a_words = a_words.contiguous()
    status = lib.bidm_conv2d(
        _ptr(a_words), b, h, w, weight.cin, _ptr(weight.get_panel(lib)), _ptr(weight.tapsum), weight.cout,
        kh, kw, sh, sw, ph, pw, ho, wo, _MODES[code], _ptr(y), torch.get_num_threads(), ctypes.byref(epi),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"bidm_conv2d failed with status {status} (kernel taps > 64 or out of memory)")
    return y


class PreparedConv:
    """One fused binary conv layer's two C calls with everything that is fixed between forwards resolved once.

    ``pack_input`` + ``binary_conv2d`` with an `Epilogue` cost ~100 us of Python per layer (argument checks, ctypes
    conversions, the epilogue struct), as much as the kernels themselves on a batch-1 4x4 layer. Here the weight
    panel, tap sums, alpha / bias / K-conv pointers, shapes and the C epilogue struct are prepared once (C backend
    only); a call allocates the two outputs and passes integers. Same C functions, same results. ``pack`` and
    ``gemm`` are separate methods so `bidm.export.timing` can attribute their time.
    """

    def __init__(self, weight: KernelWeight, stride, padding, code: str, alpha, bias, shift, k_weight, k_bias, scale):
        lib = library()
        self._pack_fn, self._conv_fn = lib.bidm_pack_input, lib.bidm_conv2d
        self.weight, self.mode = weight, _MODES[code]
        self._keep = [t for t in (alpha, bias, shift, k_weight) if t is not None]  # the pointers below stay valid
        self._shift = 0 if shift is None else shift.data_ptr()
        self._panel, self._tapsum = weight.get_panel(lib).data_ptr(), weight.tapsum.data_ptr()
        self.stride, self.padding = stride, padding
        self.wc = weight.words.shape[-1]
        self._has_k = k_weight is not None  # no K conv (BiDM's linear layers): K = 1, mean_c|x| unused
        kw_ptr = None if k_weight is None else k_weight.data_ptr()
        ptrs = [None if t is None else t.data_ptr() for t in (alpha, None, bias, None, None)] + [kw_ptr]
        self._epi = _CEpilogue(*ptrs, float(scale), float(k_bias), 0, 1)

    @property
    def shift_ptr(self) -> int | None:
        """The input threshold's float32 data (None: no threshold), for a pass that packs for this conv."""
        return self._shift or None

    def pack(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed codes of ``x + shift`` and mean_c|x| (``x``: float32, channels last)."""
        b, c, h, w = x.shape
        words = torch.empty(b, h, w, self.wc, dtype=torch.int64)
        mean = torch.empty(b, 1, h, w, dtype=torch.float32)
        self._pack_fn(x.data_ptr(), b, c, h * w, 1, self._shift, self.mode, words.data_ptr(), mean.data_ptr(),
                      torch.get_num_threads())  # fmt: skip
        return words, mean

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        return conv_output_size(h, w, self.weight.kernel_size, self.stride, self.padding)

    def gemm(self, words: torch.Tensor, mean: torch.Tensor, res: torch.Tensor | None,
             row_bias: torch.Tensor | None = None, res_up: int = 1) -> torch.Tensor:  # fmt: skip
        """The popcount conv with the epilogue (alpha, K map of ``mean``, bias, ``scale * res`` (read
        nearest-upsampled by ``res_up``), then ``row_bias`` [B, Cout], see `Epilogue`), channels last."""
        b, h, w, _ = words.shape
        ho, wo = self.output_size(h, w)
        cout = self.weight.cout
        y = torch.empty(b, ho, wo, cout, dtype=torch.float32).permute(0, 3, 1, 2)
        epi = self._epi
        epi.kmean = mean.data_ptr() if self._has_k else None
        if res is not None:
            shape = (b, cout, ho // res_up, wo // res_up)
            if not (res.dtype == torch.float32 and is_channels_last(res) and res.shape == shape):
                res = _residual(res, shape)[0]
            epi.res, epi.res_nhwc = res.data_ptr(), int(is_channels_last(res))
        else:
            epi.res = None
        if res_up != 1 and (res is None or not epi.res_nhwc or ho % res_up or wo % res_up):
            raise ValueError(f"res_up={res_up} needs a channels-last residual and an output size divisible by it")
        epi.res_up = res_up
        if row_bias is not None:
            if row_bias.dtype != torch.float32 or not row_bias.is_contiguous() or row_bias.numel() != b * cout:
                raise ValueError(f"row_bias must be float32 contiguous [{b}, {cout}], got {tuple(row_bias.shape)}")
            epi.row_bias = row_bias.data_ptr()
        else:
            epi.row_bias = None
        (kh, kw), (sh, sw), (ph, pw) = self.weight.kernel_size, self.stride, self.padding
        status = self._conv_fn(
            words.data_ptr(), b, h, w, self.weight.cin, self._panel, self._tapsum, cout, kh, kw, sh, sw, ph, pw,
            ho, wo, self.mode, y.data_ptr(), torch.get_num_threads(), ctypes.byref(epi),
        )  # fmt: skip
        if status != 0:
            raise RuntimeError(f"bidm_conv2d failed with status {status} (kernel taps > 64 or out of memory)")
        return y


def binary_linear(
    a_words: torch.Tensor, weight: KernelWeight, code: str = "pm1", *, impl: str | None = None
) -> torch.Tensor:
    """``F.linear(a, w)`` on codes from packed ``a`` [B, Wc]; float32 ``[B, Cout]`` of exact integers."""
    y = binary_conv2d(a_words[:, None, None, :], weight, code=code, impl=impl)
    return y.reshape(y.shape[0], y.shape[1])


# ---------------------------------------------------------------------------------------------------------------
# Reference twin (numpy): the same layout and algorithm, integer results


def reference_conv2d(
    a_words: np.ndarray,
    w_words: np.ndarray,
    cin: int,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    code: str = "pm1",
) -> np.ndarray:
    """int64 ``[B, Cout, Ho, Wo]`` dot products of packed codes; padded taps packed as zero words.

    ``pm1``: ``dot = K - 2 popc(a ^ w) - sum over padded taps t of (Cin - 2 popc(w_t))``.
    ``01``:  ``dot = popc(a) - 2 popc(a & w)``.
    """
    b, h, w, wc = a_words.shape
    cout, kh, kw, _ = w_words.shape
    (sh, sw), (ph, pw) = stride, padding
    ho, wo = conv_output_size(h, w, (kh, kw), stride, padding)
    padded = np.zeros((b, h + 2 * ph, w + 2 * pw, wc), dtype=np.int64)
    padded[:, ph : ph + h, pw : pw + w] = a_words
    valid = np.zeros((h + 2 * ph, w + 2 * pw), dtype=bool)
    valid[ph : ph + h, pw : pw + w] = True
    # cols[b, oh, ow, dy, dx, word] = padded[b, oh*sh + dy, ow*sw + dx, word]
    cols = sliding_window_view(padded, (kh, kw), axis=(1, 2))[:, : (ho - 1) * sh + 1 : sh, : (wo - 1) * sw + 1 : sw]
    cols = cols.transpose(0, 1, 2, 4, 5, 3).reshape(b * ho * wo, kh * kw * wc)
    is_pad = ~sliding_window_view(valid, (kh, kw))[: (ho - 1) * sh + 1 : sh, : (wo - 1) * sw + 1 : sw]
    is_pad = is_pad.reshape(ho * wo, kh * kw).astype(np.int64)
    wm = w_words.reshape(cout, kh * kw * wc)
    out = np.empty((b * ho * wo, cout), dtype=np.int64)
    step = max(1, (1 << 22) // max(1, cout * wm.shape[1]))
    for m0 in range(0, cols.shape[0], step):
        rows = cols[m0 : m0 + step, None, :]
        if code == "pm1":
            out[m0 : m0 + step] = kh * kw * cin - 2 * pack.popcount(rows ^ wm[None]).sum(-1)
        else:
            out[m0 : m0 + step] = pack.popcount(rows).sum(-1) - 2 * pack.popcount(rows & wm[None]).sum(-1)
    out = out.reshape(b, ho * wo, cout)
    if code == "pm1":
        tapsum = pack.tap_sums(torch.from_numpy(np.ascontiguousarray(w_words)), cin).numpy().astype(np.int64)
        out = out - (is_pad @ tapsum.T)[None]  # [HoWo, T] @ [T, Cout]
    return out.transpose(0, 2, 1).reshape(b, cout, ho, wo)
