"""Loading a base model and its processor: a CLIP, SigLIP or LLaVA checkpoint (Hub id, local folder or bundled name).

`UWMEditor.from_pretrained` loads a base model (or a delta's) through here; the CLI and scripts load
models without an editor the same way.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from . import paths
from .paths import check_local, is_hub_id, model_location, unreachable_error


def load_model(name_or_path, revision=None, trust_remote_code: bool = False, *, subfolder: str | None = None,
               token=None, cache_dir=None, local_files_only: bool = False, force_download: bool = False,
               **model_kwargs):
    """(model, processor) for a CLIP, SigLIP or LLaVA checkpoint (Hub id, local folder or `organism`).

    `subfolder`, `token`, `cache_dir`, `local_files_only` and `force_download` reach the config, the
    weights and the processor alike. The processor is None only when the checkpoint has no processor
    files; one that exists but fails to load raises.
    """
    import transformers

    from .families import FAMILIES

    if not name_or_path:
        raise ValueError("The delta names no base model: pass model= and processor= to from_pretrained.")
    check_local(name_or_path)
    location = model_location(name_or_path)
    local = Path(location).expanduser() / (subfolder or "")
    if local.exists() and not (local / "config.json").is_file():
        raise FileNotFoundError(f"{name_or_path} is neither a delta folder (no uwm_config.json) nor a model folder "
                                "(no config.json): give a folder saved by save_pretrained or a Hub id.")
    if not local.exists() and not is_hub_id(location):
        raise FileNotFoundError(f"{name_or_path} is no folder here and no Hub repo id (owner/name): check the path.")
    if not local.exists() and not local_files_only and paths.hub_unreachable():
        config = f"{subfolder}/config.json" if subfolder else "config.json"
        if not isinstance(try_to_load_from_cache(location, config, cache_dir=cache_dir, revision=revision), str):
            raise unreachable_error(name_or_path, paths.hub_unreachable())
        local_files_only = True  # cached earlier: read it without waiting for the Hub's retries
    options = dict(revision=revision, trust_remote_code=trust_remote_code, token=token, cache_dir=cache_dir,
                   local_files_only=local_files_only, force_download=force_download,
                   **({"subfolder": subfolder} if subfolder else {}))
    config = transformers.AutoConfig.from_pretrained(location, **options)
    architecture = next((a for a in (config.architectures or []) if a in FAMILIES), None)
    model_class = getattr(transformers, architecture) if architecture else transformers.AutoModel
    model = model_class.from_pretrained(location, **options, **model_kwargs).eval()
    try:
        processor = transformers.AutoProcessor.from_pretrained(location, **options)
    except Exception as err:  # a broken processor must not pass silently as "no processor"
        missing = [name for name in TOKENIZER_LIBRARIES if name in str(err).lower()]
        if missing:  # transformers names the library in a paragraph; say how hf_uwm installs it
            raise ImportError(f"The tokenizer of {name_or_path} needs {' and '.join(missing)}, which is not installed: "
                              "pip install 'hf_uwm[siglip]' (sentencepiece and protobuf, for SigLIP and other "
                              "SentencePiece tokenizers).") from err
        if _has_processor_files(location, options):
            raise OSError(f"The processor of {name_or_path} failed to load ({type(err).__name__}: {err}); fix its "
                          "files or pass processor= to from_pretrained.") from err
        processor = None  # a weights-only checkpoint: the caller passes processor= when it needs one
    return model, processor


TOKENIZER_LIBRARIES = ("sentencepiece", "protobuf")  # what a SentencePiece tokenizer (SigLIP's) needs installed
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json")


def _has_processor_files(location: str, options: dict) -> bool:
    """Whether the checkpoint holds any processor file (True when that cannot be told, e.g. offline)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    folder = Path(location).expanduser() / (options.get("subfolder") or "")
    if folder.is_dir():
        return any((folder / name).is_file() for name in PROCESSOR_FILES)
    download = {k: options.get(k) for k in ("revision", "subfolder", "token", "cache_dir", "local_files_only")}
    for name in PROCESSOR_FILES:
        try:
            hf_hub_download(location, name, **download)
            return True
        except LocalEntryNotFoundError:
            return True  # unknown: the error of the processor itself is more useful than silence
        except EntryNotFoundError:
            continue
        except Exception:
            return True
    return False
