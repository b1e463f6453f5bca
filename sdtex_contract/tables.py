"""The parameter groups tasks are made of: model, sampling, PBR maps, outputs, and each task family's own."""

from __future__ import annotations

from .params import (
    DEVICES,
    DTYPES,
    LORAS_MAX,
    NORMAL_FORMATS,
    PATH_MAX,
    PROJECT_MODES,
    READS,
    READS_OR_HUB,
    RESIZE_MODES,
    SCHEDULERS,
    SEAMLESS_AXES,
    SEAMLESS_INPUT_AXES,
    SEED_MAX,
    SIZE_MAX,
    SIZE_MIN,
    SIZE_MULTIPLE,
    SPEEDS,
    WRITES,
    ArrayInput,
    ImageInput,
    Param,
    Range,
)

# Shared groups: tasks combine these with their own parameters.
CHANNELS_LAST_MODES = ("auto", "on", "off")
DEVICE_PARAMS: tuple[Param, ...] = (
    Param("device", str, "auto", "Where to run.", choices=DEVICES),
    Param("dtype", str, "auto", "Precision (auto: fp16 on GPU, fp32 on CPU).", choices=DTYPES),
)
MODEL_PARAMS: tuple[Param, ...] = (
    Param(
        "model",
        str,
        "",
        "Hub id, local diffusers folder, or single-file .safetensors checkpoint.",
        required=True,
        max_length=PATH_MAX,
        path=READS_OR_HUB,
    ),
    *DEVICE_PARAMS,
    Param("cpu_offload", bool, False, "Keep weights on the CPU until needed (less VRAM, slower)."),
    Param(
        "channels_last", str, "auto",
        "Keep the U-Net's tensors channels-last (faster convolutions on NVIDIA GPUs). auto: on with CUDA, off "
        "elsewhere (on the CPU it would change the last bits: off there, results equal diffusers' bit for bit).",
        choices=CHANNELS_LAST_MODES,
    ),  # fmt: skip
    Param(
        "compile", bool, False,
        "torch.compile the U-Net (CUDA only; needs Triton): the first image at each size compiles for minutes, "
        "later ones run faster; compiled kernels are cached in the worker's cache folder.",
    ),  # fmt: skip
    Param(
        "attention_slicing", bool, False,
        "Compute attention in slices (less memory, slower); off: PyTorch's fused attention (SDPA).",
    ),
    Param("allow_pickle", bool, False, "Allow pickle checkpoints (.ckpt/.pt/.bin): they can run code."),
    Param(
        "loras",
        list,
        (),
        "LoRAs to apply, each a .safetensors file, a folder holding one, or a hub id, with a weight.",
        items=(
            Param(
                "model",
                str,
                "",
                "LoRA file, folder or hub id.",
                required=True,
                max_length=PATH_MAX,
                path=READS_OR_HUB,
            ),
            Param("weight", float, 1.0, "Strength (negative: the opposite).", Range(-4.0, 4.0)),
        ),
        max_items=LORAS_MAX,
    ),
)
SAMPLING_PARAMS: tuple[Param, ...] = (
    Param("prompt", str, "", "What to paint.", required=True),
    Param("negative_prompt", str, "", "What the picture should not show (e.g. text, blur)."),
    Param(
        "seed",
        int,
        None,
        "The same seed with the same settings makes the same picture; unset picks one.",
        Range(0, SEED_MAX),
        optional=True,
    ),
    Param("steps", int, 25, "More steps add detail and take longer (20 to 30 suit most models).", Range(1, 150)),
    Param(
        "guidance_scale",
        float,
        7.5,
        "How closely to follow the prompt: about 7 suits most models, higher is stricter but harsher (1 or less: off).",
        Range(0.0, 30.0),
    ),
    Param("width", int, 512, "Image width in pixels.", Range(SIZE_MIN, SIZE_MAX, SIZE_MULTIPLE)),
    Param("height", int, 512, "Image height in pixels.", Range(SIZE_MIN, SIZE_MAX, SIZE_MULTIPLE)),
    Param("batch_size", int, 1, "How many pictures to make at once, each with its own seed.", Range(1, 8)),
    Param(
        "scheduler",
        str,
        "euler_a",
        "The sampling method: Euler Ancestral suits most models; LCM and TCD only their models or LoRAs; "
        "Trailing ones few-step models (Turbo, Hyper-SD).",
        choices=SCHEDULERS,
    ),
    Param(
        "speed", str, "off",
        "Cached U-Net steps: most steps reuse the previous full step's deep features (fast: 3 in 4 steps, "
        "faster: 5 in 6). Quicker, but details can differ from off and fine detail may soften a little.",
        choices=SPEEDS,
    ),  # fmt: skip
    Param("seamless", str, "none", "Make the texture repeat without seams across X, Y or both.", choices=SEAMLESS_AXES),
    Param("preview_every", int, 0, "Send a preview every N steps (0 = never).", Range(0, 150)),
    Param(
        "preview_decoder", str, "",
        "Tiny autoencoder that decodes the previews (hub id or diffusers folder of an AutoencoderTiny: "
        "madebyollin/taesd for SD 1.x/2.x, madebyollin/taesdxl for SDXL); empty, or not on disk: the approximation.",
        max_length=PATH_MAX, path=READS_OR_HUB,
    ),  # fmt: skip
    Param("vae_tiling", bool, False, "Decode in tiles, exactly and seamless too (2K/4K textures on small GPUs)."),
)
NORMAL_FORMAT = Param(
    "normal_format", str, "opengl", "Normal map convention (opengl = green up).", choices=NORMAL_FORMATS
)
# Each map's method: filters on the albedo (classical, instant, tiles exactly) or a Marigold model's estimate.
PBR_METHODS = ("classical", "model")
METALLIC_METHODS = ("none", "model")  # no filter can tell metal from paint: without a model there is no map
ESTIMATORS = ("depth", "normals", "intrinsics")  # the Marigold pipelines (intrinsics: albedo, roughness, metallic)
ESTIMATOR_DEFAULTS = {
    "depth": "prs-eth/marigold-depth-v1-1",
    "normals": "prs-eth/marigold-normals-v1-1",
    "intrinsics": "prs-eth/marigold-iid-appearance-v1-1",
}
# How an estimator runs (the estimate task, and every task's maps when a method is "model").
ESTIMATE_SAMPLING: tuple[Param, ...] = (
    Param(
        "estimate_steps", int, 0, "Denoising steps of each estimate (0: the model's own default, 1-4 for v1-1).",
        Range(0, 50),
    ),
    Param("ensemble_size", int, 1, "Estimates averaged per map: steadier maps, that many times slower.", Range(1, 10)),
    Param(
        "processing_resolution", int, 768,
        "Longer side the estimator works at (0: the image's own size); maps come back at the image's size.",
        Range(0, 2048, SIZE_MULTIPLE),
    ),
)  # fmt: skip
ESTIMATOR_MODELS: tuple[Param, ...] = tuple(
    Param(
        f"{kind}_model", str, model, f"Marigold {kind} model: hub id or local diffusers folder.", max_length=PATH_MAX,
        path=READS_OR_HUB,
    )
    for kind, model in ESTIMATOR_DEFAULTS.items()
)  # fmt: skip
PBR_MAP_PARAMS: tuple[Param, ...] = (
    Param(
        "normal_method",
        str,
        "classical",
        "Normal map from the albedo's filters, or a normals model's estimate.",
        choices=PBR_METHODS,
    ),
    Param(
        "height_method",
        str,
        "classical",
        "Height from the albedo's brightness, or a depth model's estimate.",
        choices=PBR_METHODS,
    ),
    Param(
        "roughness_method",
        str,
        "classical",
        "Roughness from the albedo's brightness, or an intrinsics model's.",
        choices=PBR_METHODS,
    ),
    Param(
        "metallic_method", str, "none", "No metallic map, or an intrinsics model's estimate.", choices=METALLIC_METHODS
    ),
    Param(
        "delight",
        bool,
        False,
        "Take the light and shade painted into the albedo out (an intrinsics model's albedo); the original stays.",
    ),
    *ESTIMATOR_MODELS,
    *ESTIMATE_SAMPLING,
    NORMAL_FORMAT,
    Param("normal_strength", float, 1.0, "Relief of the derived normal map (0 = flat).", Range(0.0, 10.0)),
    Param("height_contrast", float, 1.0, "Contrast of the derived height map.", Range(0.0, 4.0)),
    Param("roughness_contrast", float, 1.0, "Contrast of the derived roughness map (0 = uniform).", Range(0.0, 4.0)),
    Param("ao_strength", float, 1.0, "Darkness of derived ambient occlusion (0 = none).", Range(0.0, 10.0)),
)
OUTPUT_PARAMS: tuple[Param, ...] = (
    Param(
        "output_dir",
        str,
        "",
        "Absolute folder the files are written to.",
        required=True,
        max_length=PATH_MAX,
        path=WRITES,
    ),
    Param("filename_prefix", str, "sdtex", "Start of each file name (sanitised).", max_length=200),
)
# Tasks that start from an image: the image, how it meets width/height, and seamless with "auto".
SOURCE_PARAMS: tuple[Param, ...] = (
    Param("image", ImageInput, None, "The image to start from.", required=True),
    Param(
        "resize",
        str,
        "fit",
        "How the image meets width and height: fit inside, fill and crop, stretch, or keep its own size.",
        choices=RESIZE_MODES,
    ),
)
SEAMLESS_INPUT = Param(
    "seamless", str, "none", "Axes on which the result tiles (auto: those the input tiles on).",
    choices=SEAMLESS_INPUT_AXES,
)  # fmt: skip


def replaced(table: tuple[Param, ...], *new: Param) -> tuple[Param, ...]:
    """A parameter group with some entries swapped by name (e.g. seamless with "auto" for image tasks)."""
    by_name = {p.name: p for p in new}
    return tuple(by_name.get(p.name, p) for p in table)


# Inpainting (and outpainting, and make_seamless, which inpaint too): where the mask comes from, its edge,
# how much the masked area changes. Pixels outside the feathered mask come back unchanged, byte for byte.
MASK_SOURCES = ("image", "alpha", "rect", "none")
OUTPAINT_FILLS = ("edge", "noise")
RESIZE_KEEP = Param(
    "resize", str, "keep",
    "How the image meets width and height: keep its own size (the default: every kept pixel comes back "
    "unchanged), fit inside, fill and crop, or stretch.",
    choices=RESIZE_MODES,
)  # fmt: skip
MASK_BLUR = Param(
    "mask_blur", int, 4, "Feather radius of the mask's edge in pixels (0 = hard edge).", Range(0, 256)
)  # fmt: skip
STRENGTH = Param(
    "strength", float, 1.0, "How much the masked area changes (1 = repainted from noise).", Range(0.0, 1.0)
)  # fmt: skip
INPAINT_PARAMS: tuple[Param, ...] = (
    Param("mask", ImageInput, None, "The mask, white = repaint, the image's size (mask_from image)."),
    Param(
        "mask_from", str, "image",
        "Where the mask comes from: the mask image, the image's alpha (transparent = repaint), a rectangle "
        "(mask_x, mask_y, mask_width, mask_height), or none (outpainting only).",
        choices=MASK_SOURCES,
    ),
    Param("mask_x", int, 0, "Rectangle mask: left edge, in pixels of the image.", Range(0, 8192)),
    Param("mask_y", int, 0, "Rectangle mask: top edge, in pixels of the image.", Range(0, 8192)),
    Param("mask_width", int, 0, "Rectangle mask: width in pixels (at least 1 for mask_from rect).", Range(0, 8192)),
    Param("mask_height", int, 0, "Rectangle mask: height in pixels (at least 1 for mask_from rect).", Range(0, 8192)),
    MASK_BLUR,
    STRENGTH,
    Param("extend_left", int, 0, "Outpainting: pixels added on the left.", Range(0, SIZE_MAX, SIZE_MULTIPLE)),
    Param("extend_right", int, 0, "Outpainting: pixels added on the right.", Range(0, SIZE_MAX, SIZE_MULTIPLE)),
    Param("extend_top", int, 0, "Outpainting: pixels added at the top.", Range(0, SIZE_MAX, SIZE_MULTIPLE)),
    Param("extend_bottom", int, 0, "Outpainting: pixels added at the bottom.", Range(0, SIZE_MAX, SIZE_MULTIPLE)),
    Param(
        "outpaint_fill", str, "edge",
        "What the added area starts from: its border pixels stretched out, or noise.", choices=OUTPAINT_FILLS,
    ),
)  # fmt: skip
MAKE_SEAMLESS_PARAMS: tuple[Param, ...] = (
    Param(
        "band_width", int, 64, "Width of the band repainted across each wrap-around seam, in pixels.",
        Range(8, SIZE_MAX, SIZE_MULTIPLE),
    ),
    MASK_BLUR,
    STRENGTH,
)  # fmt: skip


# img2img / variations: the source picture noised to `strength`, then denoised with the prompt.
IMG2IMG_STRENGTH = Param(
    "strength", float, 0.6,
    "How much of the image is repainted: 0 returns it unchanged (no model run), 1 starts from noise "
    "(a faint trace of its colours stays). The denoising steps run are int(steps * strength).",
    Range(0.0, 1.0),
)  # fmt: skip
# Upscaling: the SD x4 upscaler when given one, else tiled img2img ("hires fix") with `model`.
UPSCALE_PARAMS: tuple[Param, ...] = (
    Param(
        "upscaler_model", str, "",
        "An SD x4 upscaler (hub id, local diffusers folder or .safetensors file); empty: tiled img2img with model.",
        max_length=PATH_MAX, path=READS_OR_HUB,
    ),
    Param("image", ImageInput, None, "The image to upscale.", required=True),
    Param("scale", int, 2, "Upscaling factor: 2 or 4.", Range(2, 4, 2)),
    Param(
        "noise_level", int, 20, "x4 upscaler: noise added to the small image (more: more invented detail).",
        Range(0, 350),
    ),
    Param(
        "strength", float, 0.35, "Tiled upscaling: how much each tile is repainted (0 = Lanczos only, no model).",
        Range(0.0, 1.0),
    ),
    Param(
        "tile_size", int, 0, "Tiled upscaling: tile size in pixels (0 = the model's native size).",
        Range(0, SIZE_MAX, SIZE_MULTIPLE),
    ),
    Param(
        "tile_overlap", int, 64, "Tiled upscaling: pixels neighbouring tiles share, blended smoothly.",
        Range(0, 1024, SIZE_MULTIPLE),
    ),
)  # fmt: skip
UPSCALE_SAMPLING: tuple[Param, ...] = replaced(
    tuple(p for p in SAMPLING_PARAMS if p.name not in ("width", "height", "batch_size", "vae_tiling")),
    Param("prompt", str, "", "What the picture shows (guides the added detail; may be empty)."),
    SEAMLESS_INPUT,
)

# Models: download a hub pipeline (only the files it needs), list what is on disk.
WEIGHT_VARIANTS = ("fp16", "fp32")
DOWNLOAD_MODEL_PARAMS: tuple[Param, ...] = (
    Param(
        "model", str, "", "Hub id of a diffusers pipeline, e.g. stabilityai/sd-turbo.", required=True, max_length=200
    ),
    Param("revision", str, "main", "Branch, tag or commit to download.", max_length=200),
    Param(
        "variant", str, "fp16",
        "Weights to fetch: fp16 (half the size) where the repository has them, else full precision; or fp32.",
        choices=WEIGHT_VARIANTS,
    ),
    Param(
        "local_dir", str, "",
        "Absolute folder to download into as a plain model folder; empty: the Hugging Face cache.",
        max_length=PATH_MAX, path=WRITES,
    ),
)  # fmt: skip
LIST_MODELS_PARAMS: tuple[Param, ...] = (
    Param(
        "models_dir", str, "",
        "Absolute folder of models to list too (diffusers folders and .safetensors files); empty: none.",
        max_length=PATH_MAX, path=READS,
    ),
    Param("include_cache", bool, True, "List the diffusers pipelines in the Hugging Face cache."),
)  # fmt: skip

# Latent travel: an animation through keyframes (prompt, negative prompt, seed), every frame a full generation.
EASINGS = ("linear", "ease_in_out")
EMBEDDING_INTERPOLATIONS = ("linear", "slerp")
TRAVEL_EXPORTS = ("none", "mp4", "webp", "gif")
KEYFRAMES_MAX, TRAVEL_FRAMES_MAX = 64, 1000
KEYFRAME_ITEMS: tuple[Param, ...] = (
    Param("prompt", str, "", "What this keyframe shows.", required=True),
    Param("negative_prompt", str, "", "What to avoid at this keyframe."),
    Param("seed", int, None, "This keyframe's seed; unset picks one.", Range(0, SEED_MAX), optional=True),
)
TRAVEL_PARAMS: tuple[Param, ...] = (
    Param(
        "keyframes", list, (), "The keyframes the animation passes through, in order (at least 2).",
        required=True, items=KEYFRAME_ITEMS, max_items=KEYFRAMES_MAX,
    ),
    Param(
        "frames", int, 12, "Frames per transition: from one keyframe (included) to the next (not included).",
        Range(1, TRAVEL_FRAMES_MAX),
    ),
    Param("loop", bool, False, "Travel from the last keyframe back to the first: the animation cycles without a jump."),
    Param(
        "easing", str, "linear", "Pace of each transition: linear, or ease_in_out (slows down at the keyframes).",
        choices=EASINGS,
    ),
    Param(
        "embedding_interpolation", str, "linear", "How the prompts' embeddings blend: linear or slerp (spherical).",
        choices=EMBEDDING_INTERPOLATIONS,
    ),
    Param(
        "export", str, "none", "Also write the frames as one animation: mp4 (needs imageio-ffmpeg), webp or gif.",
        choices=TRAVEL_EXPORTS,
    ),
    Param("fps", int, 24, "Frames per second of the exported animation.", Range(1, 120)),
)  # fmt: skip


def travel_length(keyframes: int, frames: int, loop: bool) -> int:
    """Frames in a travel: `frames` per transition; open, the last keyframe ends it; looped, one transition
    more leads back to the first keyframe (frame 0 would follow the last)."""
    return frames * keyframes if loop else frames * (keyframes - 1) + 1


# The sampling group without what each keyframe sets itself (one picture per frame: no batch).
TRAVEL_SAMPLING = tuple(p for p in SAMPLING_PARAMS if p.name not in ("prompt", "negative_prompt", "seed", "batch_size"))

# DreamBooth-LoRA training: photos of a subject (or a style) and a prompt with a rare token; the result is a LoRA.
TRAIN_MODEL_PARAMS = tuple(p for p in MODEL_PARAMS if p.name in ("model", "device", "dtype", "allow_pickle"))
TRAIN_LORA_PARAMS: tuple[Param, ...] = (
    Param("photos_dir", str, "", "Folder of photos (JPEG, PNG, WebP; any size).", max_length=PATH_MAX, path=READS),
    Param(
        "photo_files", list, (), "Photo files, instead of (or besides) a folder.",
        items=(Param("path", str, "", "Absolute path of a photo.", required=True, max_length=PATH_MAX, path=READS),),
        max_items=1000,
    ),
    Param("token", str, "sks", "The rare word that names the subject; it must appear in instance_prompt."),
    Param("instance_prompt", str, "", "What the photos show, with the token: 'a photo of sks wood'.", required=True),
    Param(
        "class_prompt", str, "",
        "The subject's class without the token (e.g. 'a photo of wood'): turns on prior preservation with "
        "images the model makes of it. Empty: off.",
    ),
    Param("class_images", int, 50, "Prior preservation: how many class images (made once, cached).", Range(1, 1000)),
    Param("prior_loss_weight", float, 1.0, "Prior preservation: weight of the class images' loss.", Range(0.0, 10.0)),
    Param(
        "class_images_dir", str, "", "Where class images are cached (empty: the user cache folder).",
        max_length=PATH_MAX, path=WRITES,
    ),
    Param("resolution", int, 512, "Training size in pixels (photos: scaled, centre-cropped).", Range(32, 1024, 8)),
    Param("steps", int, 500, "Training steps (optimizer updates).", Range(1, 100_000)),
    Param("learning_rate", float, 1e-4, "AdamW learning rate.", Range(1e-7, 0.1)),
    Param("rank", int, 4, "LoRA rank: more learns more detail, and makes a larger file.", Range(1, 256)),
    Param("batch_size", int, 1, "Photos per step.", Range(1, 16)),
    Param("train_text_encoder", bool, False, "Also train a LoRA on the text encoder (learns the token better)."),
    Param("seed", int, 0, "Seed of the LoRA's start, the noise and the photo order.", Range(0, SEED_MAX)),
    Param("sample_prompt", str, "", "Prompt of the sample images (empty: instance_prompt)."),
    Param("sample_every", int, 0, "Make a sample image every N steps, and at the end (0 = never).", Range(0, 100_000)),
    Param("checkpoint_every", int, 0, "A resumable checkpoint every N steps (0: on cancel only).", Range(0, 100_000)),
    Param(
        "resume_from", str, "", "A checkpoint file to continue (same photos and settings).", max_length=PATH_MAX,
        path=READS,
    ),
)  # fmt: skip


# Projection texturing: depth-guided views of meshes, projected back and baked into each object's UV texture.
PROJECT_SAMPLING = replaced(
    tuple(p for p in SAMPLING_PARAMS if p.name not in ("batch_size", "seamless", "vae_tiling")),
    Param("width", int, 512, "Width of each view in pixels.", Range(SIZE_MIN, SIZE_MAX, SIZE_MULTIPLE)),
    Param("height", int, 512, "Height of each view in pixels.", Range(SIZE_MIN, SIZE_MAX, SIZE_MULTIPLE)),
)
PROJECT_PARAMS: tuple[Param, ...] = (
    Param(
        "controlnet", str, "",
        "Depth ControlNet for the model: hub id, local folder or single-file .safetensors "
        "(e.g. lllyasviel/control_v11f1p_sd15_depth).",
        required=True, max_length=PATH_MAX, path=READS_OR_HUB,
    ),
    Param("controlnet_scale", float, 1.0, "How strongly the depth steers the picture.", Range(0.0, 2.0)),
    Param("control_start", float, 0.0, "Fraction of the steps after which the depth starts to steer.", Range(0.0, 1.0)),
    Param("control_end", float, 1.0, "Fraction of the steps after which the depth stops steering.", Range(0.0, 1.0)),
    Param("triangles", ArrayInput, None, "float32 [..., 3, 3]: each triangle's corners in world space.", required=True),
    Param("uvs", ArrayInput, None, "float32 [..., 3, 2]: each corner's UV (v up), as triangles.", required=True),
    Param(
        "object_index", ArrayInput, None,
        "int32 [...]: each triangle's object (0, 1, ...: textured; -1: only occludes), as triangles.", required=True,
    ),
    Param(
        "cameras", ArrayInput, None,
        "float32 [views, 2, 4, 4]: per view, world to camera (Blender's camera, looking down -Z) and the OpenGL "
        "projection.",
        required=True,
    ),
    Param(
        "mode", str, "sequential",
        "sequential: each view in turn inpaints what the earlier ones left. synchronized: all views denoised "
        "together through one shared texture, so they agree (no seams between views; samplers that add noise "
        "per step run as their deterministic twin).",
        choices=PROJECT_MODES,
    ),
    Param(
        "sync_until", float, 0.8,
        "Synchronized mode: fraction of the steps the views share one texture; the rest refine each view "
        "alone (0: views independent).",
        Range(0.0, 1.0),
    ),
    Param("texture_size", int, 1024, "Size of each object's baked texture in pixels (square).", Range(64, 4096, 8)),
    Param("margin", int, 8, "Texels painted around each UV island, so filtering shows no seams.", Range(0, 64)),
    Param(
        "refine_below", float, 0.3,
        "Later views repaint surface the earlier ones saw only at a facing cosine below this (0: only unseen).",
        Range(0.0, 1.0),
    ),
    MASK_BLUR,
    Param(
        "match_colors", bool, False,
        "Sequential mode: each later view's colours matched (mean and spread in Lab) to the earlier views' paint "
        "where it repaints it, before it is baked, so views that drift in colour or light meet without a step.",
    ),
    Param("allow_uv_overlap", bool, False, "Bake even where UV islands overlap (they then share paint)."),
    Param(
        "apply_unseen", bool, False,
        "Give objects no view saw (hidden inside another, say) their flat grey texture anyway; off: they keep "
        "the material they had.",
    ),
)  # fmt: skip
