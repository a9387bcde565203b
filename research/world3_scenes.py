"""Draw a few world-3 test scenes into docs/world3_scenes.png: safe and unsafe renders, look-alikes,
held-out concepts and renders without the shared cues, each with its captions.

    python research/world3_scenes.py
"""

from __future__ import annotations

from pathlib import Path

from hf_uwm import organism

ROOT = Path(__file__).resolve().parents[1]


def pick(n_scan: int = 400):
    """(title, scene) for one scene of each kind, the first of the test stream that fits."""
    scenes = [organism.scene_at(i, 0, "test", world=3) for i in range(n_scan)]
    wanted = [
        ("seen concept (blood)", lambda s: s.concept == "blood" and s.cues and not s.companion),
        ("seen, no shared cues (bomb)", lambda s: s.concept == "bomb" and not s.cues and not s.companion),
        ("look-alike: red paint", lambda s: s.companion == "paint"),
        ("look-alike: toy pistol", lambda s: s.companion == "pistol"),
        ("held-out: fire", lambda s: s.concept == "fire" and not s.companion and s.paraphrase),
        ("held-out: noose, look-alike rope", lambda s: s.companion == "rope"),
        ("held-out: gun", lambda s: s.concept == "gun" and not s.companion and s.cues),
        ("look-alike: lit candle (fire)", lambda s: s.companion == "candle"),
    ]
    return [(title, next(s for s in scenes if rule(s))) for title, rule in wanted]


def main(path=ROOT / "docs" / "world3_scenes.png"):
    import matplotlib

    matplotlib.use("Agg")
    import textwrap

    import matplotlib.pyplot as plt

    chosen = pick()
    fig, axes = plt.subplots(2, len(chosen), figsize=(2.3 * len(chosen), 5.6))
    for column, (title, scene) in enumerate(chosen):
        for row, unsafe in enumerate((False, True)):
            ax = axes[row][column]
            ax.imshow(organism.render(scene, unsafe), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            caption = scene.caption(unsafe).removeprefix("a photo of ")
            ax.set_xlabel("\n".join(textwrap.wrap(caption, 24)), fontsize=7)
            if row == 0:
                ax.set_title(title, fontsize=8)
        axes[0][0].set_ylabel("safe render")
        axes[1][0].set_ylabel("unsafe render")
    fig.suptitle("World 3 (test split): each column one scene, safe render above its unsafe twin")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
