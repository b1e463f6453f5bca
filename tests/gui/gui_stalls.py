"""Stalls: how long Blender's event loop was blocked during the GUI test, and by what (used by gui_driver.py)."""

import time
from contextlib import contextmanager

import blf
import bpy
import gpu

START = time.monotonic()  # the driver's timeline starts here too


class Stalls:
    """How long Blender's event loop was blocked, and by what.

    A 0.02 s heartbeat timer: each gap between its ticks is a time Blender could not react. The gaps are
    recorded per phase: "idle" (no job, the same CPU load beside Blender, the add-on's own redraw function
    called as often as during a job) and "steps" (two jobs stepping, until the first result is applied:
    applying a result redraws the viewport once by design). A stall in "steps" that "idle" also has is the
    machine's; one that only "steps" has comes from the add-on, directly (time inside its timer, panel draws
    and preview drawing, each wrapped and timed) or indirectly (a 3D viewport redraw its data changes caused:
    the viewport's draw handlers time each redraw). The driver's own work (screenshots) pauses recording.
    """

    INTERVAL = 0.02

    def __init__(self):
        self.phase, self.last = None, None
        self.gaps: dict[str, list] = {}  # phase -> [(gap seconds, ended at)]
        self.callbacks: dict[str, list] = {}  # add-on callback -> [calls, total s, max s]
        self.viewport: list[tuple] = []  # 3D viewport redraws: (phase, started, seconds)
        self._drawing_since = None
        self.last_viewport_draw = 0.0
        self.result_applied = False
        self.redraw_requests: list[float] = []  # when the add-on tagged its regions for a redraw

    def tick(self) -> float:
        now = time.monotonic()
        if self.phase and self.last is not None:
            self.gaps[self.phase].append((now - self.last, round(now - START, 2)))
        self.last = now
        return self.INTERVAL

    def start(self, phase: str | None) -> None:
        self.phase, self.last = phase, None
        if phase:
            self.gaps.setdefault(phase, [])

    @contextmanager
    def paused(self):
        phase = self.phase
        self.start(None)
        try:
            yield
        finally:
            self.start(phase)

    def timed(self, name: str, function):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                entry = self.callbacks.setdefault(name, [0, 0.0, 0.0, 0.0])
                took = time.perf_counter() - started
                if took > entry[2]:
                    entry[2:] = [took, round(time.monotonic() - START, 2)]
                entry[0], entry[1] = entry[0] + 1, entry[1] + took

        return wrapper

    def watch_addon(self, ui) -> None:
        """Wrap the add-on's timer, its preview drawing and its panels' draw methods (looked up at each call)."""
        jobs, preview = ui.jobs, ui.preview
        jobs._tick = self.timed("timer", jobs._tick)
        preview._draw = self.timed("preview_draw", preview._draw)
        jobs._finish = self.timed("apply_result", self._ends_steps(jobs._finish))
        jobs.redraw = self.timed("redraw_request", self._noted(jobs.redraw))
        # Inside the preview's drawing: which GPU call costs what (shader compiles are slow on llvmpipe)
        preview.draw_texture_2d = self.timed("gpu draw_texture_2d", preview.draw_texture_2d)
        gpu.types.GPUTexture = self.timed("gpu GPUTexture", gpu.types.GPUTexture)
        gpu.shader.from_builtin = self.timed("gpu shader", gpu.shader.from_builtin)
        gpu.types.Buffer = self.timed("gpu Buffer", gpu.types.Buffer)
        preview.rgba_floats = self.timed("rgba_floats", preview.rgba_floats)
        for name in ("position", "size", "color", "draw"):
            setattr(blf, name, self.timed(f"blf {name}", getattr(blf, name)))
        for panel in ui.panels:
            panel.draw = self._timed_draw(f"draw {panel.__name__}", panel.draw)

    def _timed_draw(self, name: str, draw):
        timed = self.timed(name, draw)

        def panel_draw(panel, context):  # Blender passes as many arguments as the signature names
            return timed(panel, context)

        return panel_draw

    def _noted(self, redraw):
        def noting_redraw_requests(*args, **kwargs):
            self.redraw_requests.append(time.monotonic() - START)
            return redraw(*args, **kwargs)

        return noting_redraw_requests

    def _ends_steps(self, finish):
        def first_result_ends_the_steps(*args):
            self.result_applied = True
            if self.phase in ("steps", "user_selects"):
                self.start("after_first_result")
            return finish(*args)

        return first_result_ends_the_steps

    def watch_viewport(self) -> None:
        space = bpy.types.SpaceView3D
        space.draw_handler_add(self._viewport_start, (), "WINDOW", "PRE_VIEW")
        space.draw_handler_add(self._viewport_end, (), "WINDOW", "POST_PIXEL")

    def _viewport_start(self) -> None:
        self._drawing_since = time.monotonic()

    def _viewport_end(self) -> None:
        self.last_viewport_draw = time.monotonic()
        if self._drawing_since is not None and self.phase:
            took = time.monotonic() - self._drawing_since
            self.viewport.append((self.phase, round(self._drawing_since - START, 2), round(took, 3)))
        self._drawing_since = None

    def summary(self) -> dict:
        phases = {}
        for phase, gaps in self.gaps.items():
            worst = sorted(gaps, reverse=True)[:8]
            phases[phase] = {"ticks": len(gaps), "max_gap": round(worst[0][0], 3) if worst else 0.0}
            phases[phase]["over_0.1"] = sum(gap > 0.1 for gap, _ in gaps)
            phases[phase]["worst"] = [(round(gap, 3), at) for gap, at in worst]
            phases[phase]["viewport_redraws"] = [v[1:] for v in self.viewport if v[0] == phase]
            phases[phase]["over_0.1_after_redraw_request"] = sum(
                gap > 0.1 and any(at - gap - 0.01 <= r <= at + 0.01 for r in self.redraw_requests) for gap, at in gaps
            )
        callbacks = {
            name: {"calls": c, "total": round(t, 3), "max": round(m, 4), "max_at": at}
            for name, (c, t, m, at) in self.callbacks.items()
        }
        return {"phases": phases, "callbacks": callbacks}
