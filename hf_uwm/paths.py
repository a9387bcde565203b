"""What a name given for a model, a delta or a data set means: the bundled organism, a local path or a Hub id.

A name that can only be a local path (it starts with `.`, `~` or `/`, holds a backslash or more than
one `/`, or ends in a data-file suffix) and does not exist is a `FileNotFoundError` at once, before
anything asks the Hub: a typo should not wait for network retries and then blame the Hub. So is a
near miss of a bundled name (`organsim`), with the name it missed. The Hub itself is asked once,
briefly, whether it answers at all (`hub_unreachable`), before any download that would retry for
half a minute.
A delta records its base model by a name that means the same on every machine: a Hub id, or
`organism` for the bundled model; never a path of the machine that made it.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from pathlib import Path

ORGANISM = "organism"  # the bundled model organism, accepted wherever a model name is
ORGANISM_HARD = "organism-hard"  # the bundled model organism of world 3 (unseen concepts, paraphrases, look-alikes)
CAPTIONER = "organism-captioner"  # the bundled LLaVA captioner of the organism world
# Models shipped inside the package, by the name that means them on every machine -> their folder.
BUNDLED = {ORGANISM: "organism_model", ORGANISM_HARD: "organism_hard_model", CAPTIONER: "organism_captioner_model"}
ORGANISM_WORLDS = {ORGANISM: 2, ORGANISM_HARD: 3}  # a bundled organism's name -> the world it was trained on
DATA_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".arrow", ".txt", ".safetensors")


def looks_like_path(name) -> bool:
    """True for a name that only a local path could mean (a Hub id is `name` or `org/name`)."""
    if isinstance(name, os.PathLike):
        return True
    text = str(name)
    return (text.startswith((".", "~", "/")) or "\\" in text or text.count("/") > 1
            or re.match(r"^[A-Za-z]:", text) is not None or text.lower().endswith(DATA_SUFFIXES))


def check_local(name) -> None:
    """Raise FileNotFoundError for a path-looking name with nothing behind it, or a near miss of a bundled name."""
    if looks_like_path(name) and not Path(os.fspath(name)).expanduser().exists():
        raise FileNotFoundError(f"no such file or folder: {os.fspath(name)} (it looks like a local path, so the "
                                "Hub was not asked; a Hub id looks like 'org/name').")
    near = near_bundled_name(name)
    if near is not None:
        raise FileNotFoundError(f"{name!r} is no bundled name and no file or folder here: did you mean {near!r}? "
                                f"(The bundled names are {', '.join(BUNDLED)}; the Hub was not asked.)")


def near_bundled_name(name) -> str | None:
    """The bundled name that `name` nearly spells (a typo such as 'organsim'), when nothing local has that name."""
    if not isinstance(name, str) or name in BUNDLED or "/" in name or Path(name).expanduser().exists():
        return None
    return next(iter(difflib.get_close_matches(name.lower(), BUNDLED, n=1, cutoff=0.8)), None)


@functools.cache
def hub_unreachable() -> str | None:
    """Why the Hub cannot be asked now, or None when it answers: one request of a few seconds, once per process.

    `huggingface_hub` retries a failed connection five times (about 25 s) before it says anything; one
    short try tells a machine without network at once, and the caller falls back on the cache.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=5)
    except Exception as err:  # any failure to connect (DNS, refused, timeout, TLS) means the same here
        return f"{constants.ENDPOINT} did not answer: {type(err).__name__}"
    return None


def unreachable_error(name, reason: str) -> OSError:
    """The one-line error for a Hub name that is neither local nor cached while the Hub cannot be asked."""
    fix = "unset HF_HUB_OFFLINE" if "HF_HUB_OFFLINE" in reason else "check the name and the connection"
    return OSError(f"{name!r} is not a local folder nor in the Hugging Face cache, and the Hub could not be reached "
                   f"({reason}): {fix}, or give a local folder.")


def is_hub_id(name) -> bool:
    """A name that can only mean a Hub repo: not the organism, nothing local, a valid repo id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or not isinstance(name, str) or name in BUNDLED or looks_like_path(name):
        return False
    if Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def bundled_path(name: str) -> str:
    """The folder of a bundled model (loadable with its class's or AutoProcessor's from_pretrained)."""
    return str(Path(__file__).parent / BUNDLED[name])


def organism_path() -> str:
    """The folder of the bundled organism model (loadable with AutoModel/AutoProcessor.from_pretrained)."""
    return bundled_path(ORGANISM)


def model_location(name) -> str:
    """Where `from_pretrained` reads a model named `name`: a bundled model's folder for its name.

    A bundled name whose folder holds no model (world 3's is trained, not shipped, until it is committed)
    is a FileNotFoundError saying how to make it, not a Hub lookup of a path.
    """
    if name not in BUNDLED:
        return os.fspath(name)
    folder = bundled_path(name)
    if not (Path(folder) / "config.json").is_file():
        how = {ORGANISM_HARD: "train it with `python scripts/train_organism.py --world 3`"}.get(name, "reinstall hf_uwm")
        raise FileNotFoundError(f"the bundled model {name!r} is missing ({folder} holds no config.json): {how}.")
    return folder


def local_base_folder(name) -> str | None:
    """The folder of a base model named by a local path or a bundled name; None for a Hub id or no name.

    A model card reads the base model's license from there (the editor's and a push's card alike).
    """
    folder = Path(model_location(name)).expanduser() if name else None
    return str(folder) if folder is not None and folder.is_dir() else None


def portable_base_name(name) -> str | None:
    """The base model as a delta records it: a Hub id or a bundled name; None for a local folder or unknown.

    A path means nothing on another machine (nor after the folder moves), so it is never recorded.
    """
    if not name:
        return None
    text = os.fspath(name)
    bundled = next((b for b in BUNDLED if text == b or _same_folder(text, bundled_path(b))), None)
    return bundled or (text if is_hub_id(text) else None)


def _same_folder(a: str, b: str) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).resolve()
    except OSError:
        return False


HUB_CARDS = ("model_card.md", "dataset_card.md")  # the card templates of the top-level hub_cards/ folder


def hub_card_path(name: str) -> Path:
    """A card template of hub_cards/: the checkout's top-level folder, else the copy an install of the wheel
    put under its data prefix (share/hf_uwm/hub_cards, listed in the distribution's RECORD)."""
    if name not in HUB_CARDS:
        raise ValueError(f"{name!r} is no card template of hf_uwm: choose one of {', '.join(HUB_CARDS)}.")
    checkout = Path(__file__).resolve().parents[1] / "hub_cards" / name
    if checkout.is_file():
        return checkout
    from importlib import metadata

    try:
        files = metadata.distribution("hf_uwm").files or []
    except metadata.PackageNotFoundError:
        files = []
    installed = next((Path(f.locate()).resolve() for f in files
                      if f.as_posix().endswith(f"share/hf_uwm/hub_cards/{name}")), None)
    if installed is None or not installed.is_file():
        raise FileNotFoundError(f"the card template {name} is in neither {checkout.parent} nor the installed "
                                "hf_uwm's share/hf_uwm/hub_cards: reinstall hf_uwm (pip install -e . in a checkout).")
    return installed
