"""The diffusion worker: owns torch and diffusers, never bpy. Start it with `python -m backend serve`."""

__version__ = "0.1.0"
