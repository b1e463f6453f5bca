"""A stand-in for the few torchvision transforms diffusers' DreamBooth example uses on its photos (Resize,
CenterCrop, RandomCrop, ToTensor, Normalize), so the unmodified example script runs here: torchvision has no
CPU wheel for this machine's torch build offline. It has no package metadata, so transformers does not take
it for torchvision. The transforms run once per photo in the data loader, outside the measured U-Net step."""
