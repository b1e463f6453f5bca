"""torchvision.transforms' behaviour on PIL images, for the DreamBooth example's data pipeline only."""

from __future__ import annotations

import enum
import random

import numpy as np
import PIL.Image
import torch


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"


_PIL = {
    InterpolationMode.NEAREST: PIL.Image.Resampling.NEAREST,
    InterpolationMode.BILINEAR: PIL.Image.Resampling.BILINEAR,
    InterpolationMode.BICUBIC: PIL.Image.Resampling.BICUBIC,
    InterpolationMode.LANCZOS: PIL.Image.Resampling.LANCZOS,
}


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, image):
        for transform in self.transforms:
            image = transform(image)
        return image


class Resize:
    """An int size: the shorter side becomes `size`, the aspect kept (torchvision's rounding: int())."""

    def __init__(self, size: int, interpolation=InterpolationMode.BILINEAR):
        self.size, self.interpolation = size, interpolation or InterpolationMode.BILINEAR

    def __call__(self, image: PIL.Image.Image) -> PIL.Image.Image:
        width, height = image.size
        if width <= height:
            new = (self.size, int(self.size * height / width))
        else:
            new = (int(self.size * width / height), self.size)
        return image.resize(new, _PIL[self.interpolation])


class CenterCrop:
    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: PIL.Image.Image) -> PIL.Image.Image:
        width, height = image.size
        left, top = int(round((width - self.size) / 2.0)), int(round((height - self.size) / 2.0))
        return image.crop((left, top, left + self.size, top + self.size))


class RandomCrop(CenterCrop):
    def __call__(self, image: PIL.Image.Image) -> PIL.Image.Image:
        width, height = image.size
        left, top = random.randint(0, width - self.size), random.randint(0, height - self.size)
        return image.crop((left, top, left + self.size, top + self.size))


class ToTensor:
    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return (tensor - mean) / std
