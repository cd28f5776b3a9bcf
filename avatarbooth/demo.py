"""``avatarbooth demo``: the whole journey, scripted, through the console adapter.

The selfies are three variants of one real photo that ships offline (scikit-image's astronaut, Eileen
Collins, public domain), plus a text file and insightface's group photo to show refusals. With the
tiny preset every model has random weights: the pipeline is real, the images are noise.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

from avatarbooth.config import AppConfig
from avatarbooth.runtime import default_out_dir, serve_chat


def write_demo_photos(folder: Path) -> list[Path]:
    """Three selfies of one person, one file that is not an image, one group photo."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    original = Image.fromarray(data.astronaut())
    variants = [
        original,
        ImageEnhance.Brightness(ImageOps.mirror(original)).enhance(1.15),
        original.crop((32, 0, 480, 448)).resize((480, 480), Image.Resampling.LANCZOS),
    ]
    paths = []
    for number, image in enumerate(variants, start=1):
        path = folder / f"selfie-{number}.jpg"
        image.save(path, format="JPEG", quality=92)
        paths.append(path)
    notes = folder / "notes.txt"
    notes.write_text("not a photo\n")
    paths.append(notes)
    group = _group_photo()
    if group is not None:
        path = folder / "group.jpg"
        path.write_bytes(group)
        paths.append(path)
    return paths


def _group_photo() -> bytes | None:
    import insightface

    path = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    if not path.exists():
        return None
    out = io.BytesIO()
    Image.open(path).convert("RGB").save(out, format="JPEG", quality=90)
    return out.getvalue()


def demo_script(photos: list[Path]) -> str:
    quoted = " ".join(f'"{p}"' for p in photos)
    return "\n".join(
        [
            "/start",
            "/agree",
            f"/photo {quoted}",
            "/photos",
            "/preview",
            "/train lora",
            "/draw me as an astronaut",
            "/status",
            "/forget",
            "",
        ]
    )


async def run_demo(config: AppConfig, *, out_dir: Path | None, as_json: bool) -> int:
    """Run the scripted journey; with ``as_json`` the last stdout line lists every image and job."""
    from bot.console import ConsoleAdapter
    from bot.service import UserRef

    started = time.perf_counter()
    out_dir = (out_dir or default_out_dir(config, "demo")).resolve()
    photos = write_demo_photos(out_dir / "selfies")
    print(f"AvatarBooth demo, preset {config.engine.preset!r}; images go to {out_dir}", flush=True)
    async with serve_chat(config) as running:
        console = ConsoleAdapter(
            running.service,
            user=UserRef(platform="console", platform_user_id=f"demo-{time.time_ns()}"),
            out_dir=out_dir,
            stdin=io.StringIO(demo_script(photos)),
            stdout=sys.stdout,
            echo=True,
            # The demo's selfies are a public test photo (scikit-image's astronaut) and its images are
            # what it is run for: its /forget erases the data folder's records, not this output.
            forget_saved_images=False,
        )
        code = await console.run()
    images = [str(p) for p in console.written_images]
    summary = {
        "ok": code == 0 and any("preview" in Path(p).name for p in images) and any("draw" in Path(p).name for p in images),
        "preset": config.engine.preset,
        "out_dir": str(out_dir),
        "preview_images": [p for p in images if Path(p).name.startswith("preview")],
        "draw_images": [p for p in images if Path(p).name.startswith("draw")],
        "images": images,
        "job_ids": list(console.job_ids),
        "wall_s": round(time.perf_counter() - started, 2),
    }
    if config.engine.preset == "tiny":
        summary["note"] = "tiny preset: random-weight models, so the images are noise by design"
    if as_json:
        print(json.dumps(summary), flush=True)
    else:
        print(f"demo finished in {summary['wall_s']} s; images: {len(images)} in {out_dir}")
    return 0 if summary["ok"] else 1
