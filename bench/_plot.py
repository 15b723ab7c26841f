"""Plot helpers shared by the benchmark parts: matplotlib is the optional ``bench`` extra."""
from __future__ import annotations

from pathlib import Path


def pyplot(note: bool = False):
    """``matplotlib.pyplot`` on the Agg backend, or None when matplotlib is not installed (then,
    with ``note``, one line saying how to install it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if note:
            print("[bench] no plot: matplotlib is not installed (pip install -e '.[bench]')", flush=True)
        return None
    return plt


def save(fig, path, dpi: int) -> Path:
    """Lay out, write ``path`` (its directory created) and close the figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path

