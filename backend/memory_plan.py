"""A memory plan by VRAM: which of cpu_offload, vae_tiling and the precision a request on a CUDA device should use.

Pure arithmetic (no torch): the worker logs the plan as advice when it loads a model on CUDA, and the tests check
its choices. It is advice, not applied: cpu_offload and vae_tiling are plain on/off parameters with no "auto", and
dtype "auto" stays fp16 on a GPU so the warm model's key does not change with the free memory of the moment.

The working-memory figures are estimates (activations of a CFG batch, the VAE decoder's largest feature maps);
`python -m benchmarks --gpu` measures the real peaks to check them against.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
MARGIN = GIB // 2  # allocator fragmentation and cuDNN/cuBLAS workspaces
# U-Net activations of one CFG batch (2 latents) at a family's native size, fp16, fused attention (SDPA).
DENOISE_BYTES = {"sd": GIB // 2, "sdxl": int(1.5 * GIB)}
NATIVE_PIXELS = {"sd": 512 * 512, "sdxl": 1024 * 1024}
# The VAE decoder's last blocks at full size: 128-channel feature maps, with the group norms', upsampling's and
# convolutions' temporaries about 12 of them alive at once (~0.75 GiB at 512 px in fp16, 6 GiB at 1024 px in fp32).
DECODE_MAPS, DECODE_CHANNELS = 12, 128
TILE_PIXELS = 512 * 512  # diffusers' AutoencoderKL tiles at its sample_size (512 for SD, 1024 for SDXL: the larger)
UNET_SHARE = 0.75  # with model offload only the largest component (the U-Net, ~3/4 of the weights) is on the GPU


@dataclass(frozen=True)
class MemoryPlan:
    cpu_offload: bool
    vae_tiling: bool
    dtype: str
    needed_bytes: int  # the estimate for the plan's settings
    free_bytes: int

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.free_bytes

    def advice(self) -> str:
        """One line for the log: the settings and the estimate against the free memory."""
        settings = f"dtype {self.dtype}, cpu_offload {'on' if self.cpu_offload else 'off'}, vae_tiling " + (
            "on" if self.vae_tiling else "off"
        )
        verdict = "fits" if self.fits else "may not fit: try a smaller size"
        need, free = self.needed_bytes / GIB, self.free_bytes / GIB
        return f"memory plan: {settings} (needs ~{need:.1f} of {free:.1f} GiB free, {verdict})"


def decode_bytes(pixels: int, element_bytes: int, tiled: bool, family: str) -> int:
    """The VAE decode's working memory for an image of `pixels`, untiled or in tiles."""
    tile = max(TILE_PIXELS, NATIVE_PIXELS[family])
    return DECODE_MAPS * DECODE_CHANNELS * element_bytes * (min(pixels, tile) if tiled else pixels)


def plan_memory(
    free_bytes: int, weights_bytes: int, family: str, width: int, height: int, *, bf16_supported: bool = False
) -> MemoryPlan:
    """The cheapest settings that fit `free_bytes`: everything on the GPU, then VAE tiling, then model offload.

    weights_bytes: the model's weights in half precision (its size on disk in fp16). family: "sd" or "sdxl".
    SDXL's VAE overflows in fp16 and decodes in fp32 (diffusers' force_upcast): bf16 needs no upcast, so on a GPU
    that has bf16 it is chosen when the fp32 decode is what would not fit.
    """
    if family not in NATIVE_PIXELS:
        raise ValueError(f"family must be one of {', '.join(NATIVE_PIXELS)}, got {family!r}")
    pixels = width * height
    denoise = int(DENOISE_BYTES[family] * pixels / NATIVE_PIXELS[family])
    upcast_bytes = 4 if family == "sdxl" else 2  # the decode's element size in fp16 (fp32 where it upcasts)

    def need(offload: bool, tiled: bool, element_bytes: int) -> int:
        weights = int(weights_bytes * UNET_SHARE) if offload else weights_bytes
        return weights + max(denoise, decode_bytes(pixels, element_bytes, tiled, family)) + MARGIN

    dtypes = ["fp16", "bf16"] if bf16_supported and upcast_bytes == 4 else ["fp16"]
    rungs = [(False, False), (False, True), (True, True)]  # (offload, tiled): all on the GPU, then tiles, then offload
    plans = [
        MemoryPlan(offload, tiled, dtype, need(offload, tiled, 2 if dtype == "bf16" else upcast_bytes), free_bytes)
        for offload, tiled in rungs
        for dtype in dtypes
    ]
    # The first that fits; when none does, the one that needs least (its advice says it may not fit).
    return next((plan for plan in plans if plan.fits), min(plans, key=lambda plan: plan.needed_bytes))
