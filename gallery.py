"""A picture of every visual shift of one env: rows = shift kinds, columns = severities, each cell the first frame
after reset(seed) under that shift.

    python gallery.py --env pusher --out docs/gallery_pusher.png [--image-size 96] [--seed 0]
"""
from __future__ import annotations

import argparse

import numpy as np
from PIL import Image, ImageDraw

import envs
import shifts

LABEL_W, HEAD_H, PAD = 74, 14, 2  # pixels: row-label column, column-header row, gap between cells


def first_frame(env_name: str, shift: str, severity: str, image_size: int, seed: int) -> np.ndarray:
    env = shifts.make_shifted_env(env_name, shift, severity, image_size=image_size, seed=seed)
    try:
        return env.reset(seed=seed)[0]
    finally:
        env.close()  # MetaDrive allows one env per process, and MuJoCo contexts are worth freeing early


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="pusher", choices=[e for e in envs.ENV_NAMES if shifts.shift_names(e)])
    p.add_argument("--out", default="")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    names = shifts.shift_names(a.env)
    # Columns: the ladder, plus any extra named rung (the paper's 4th weather); rows lacking it show "n/a".
    columns = list(shifts.SEVERITIES) + sorted({v for n in names for v in shifts.severities(n)}
                                               - {*shifts.SEVERITIES, *shifts.WEATHER_LADDER.values()})
    n = a.image_size
    grid = Image.new("RGB", (LABEL_W + len(columns) * (n + PAD), HEAD_H + len(names) * (n + PAD)), "white")
    draw = ImageDraw.Draw(grid)
    for j, col in enumerate(columns):
        draw.text((LABEL_W + j * (n + PAD) + 2, 1), col.replace("_low_light", ""), fill="black")
    none = first_frame(a.env, "none", "none", n, a.seed)  # the same for every row
    for i, shift in enumerate(names):
        y = HEAD_H + i * (n + PAD)
        draw.text((2, y + n // 2 - 6), shift, fill="black")
        for j, col in enumerate(columns):
            x = LABEL_W + j * (n + PAD)
            if col not in shifts.severities(shift):
                draw.rectangle([x, y, x + n - 1, y + n - 1], fill=(200, 200, 200))
                draw.text((x + n // 2 - 8, y + n // 2 - 6), "n/a", fill="black")
                continue
            frame = none if col == "none" else first_frame(a.env, shift, col, n, a.seed)
            grid.paste(Image.fromarray(frame), (x, y))
            print(f"{shift:12s} {col:22s} mean |diff| to none: {np.abs(frame.astype(int) - none).mean():6.2f}")
    out = a.out or f"gallery_{a.env}.png"
    grid.save(out, optimize=True)
    print("wrote", out)


if __name__ == "__main__":
    main()
