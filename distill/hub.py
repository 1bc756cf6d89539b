"""`push` for a student recipe: upload `students/<name>/export/` to the Hub model repo `export.hub_repo_id`.

One commit holds every exported format folder as written (weights, model cards, `experts.json`,
`workflow_api.json`), a root `README.md` (the card of the first format in `export.formats`, so the repo page shows
it) and `recipe.yaml` (the resolved recipe, with no key that looks like a secret). The token comes from the
environment (HF_TOKEN) or `hf auth login`, resolved by huggingface_hub; it is never passed in, logged or written.
A failure changes nothing local, and rerunning `push` uploads again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml
from huggingface_hub import CommitOperationAdd, HfApi

from distill.config import Recipe
from distill.export import EXPORT_COMPLETE, FORMAT_FOLDERS, scrub_secrets
from synth_data.push import PushError, one_line

logger = logging.getLogger(__name__)


def exported_files(export_dir: Path, formats: list[str]) -> list[tuple[str, Path]]:
    """(path in repo, local file) for every complete format folder of `formats`, in that order."""
    files = []
    missing = []
    for fmt in dict.fromkeys(formats):
        folder = export_dir / FORMAT_FOLDERS[fmt]
        if not (folder / EXPORT_COMPLETE).is_file():
            missing.append(fmt)
            continue
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.name != EXPORT_COMPLETE and not path.name.startswith("."):
                files.append((path.relative_to(export_dir).as_posix(), path))
    if missing:
        raise ValueError(
            f"{export_dir}: export.formats {missing} not exported (no {EXPORT_COMPLETE} marker); run "
            "`python -m distill export RECIPE` first"
        )
    return files


def push_student(recipe: Recipe) -> str:
    """Create the model repo if needed (private per `export.hub_private`) and upload the student's export in one
    commit; returns the repo URL."""
    assert recipe.student is not None
    repo_id = recipe.export.hub_repo_id
    if not repo_id:
        raise ValueError(
            "export.hub_repo_id: not set; set it to a model repo you can write to, e.g. "
            f"`python -m distill push {recipe.source or 'RECIPE.yaml'} export.hub_repo_id=me/{recipe.student.name}`"
        )
    export_dir = recipe.student_dir() / "export"
    files = exported_files(export_dir, recipe.export.formats)
    first_card = export_dir / FORMAT_FOLDERS[recipe.export.formats[0]] / "README.md"
    recipe_text = yaml.safe_dump(scrub_secrets(recipe.to_dict()), sort_keys=False)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files]
    operations += [
        CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=first_card.read_bytes()),
        CommitOperationAdd(path_in_repo="recipe.yaml", path_or_fileobj=recipe_text.encode()),
    ]
    api = HfApi()  # token: HF_TOKEN or the saved login, resolved by huggingface_hub itself
    try:
        url = api.create_repo(repo_id, repo_type="model", private=recipe.export.hub_private, exist_ok=True)
        logger.info("push: uploading %d files of %s to %s", len(operations), export_dir, url)
        api.create_commit(
            repo_id=repo_id,
            repo_type="model",
            operations=operations,
            commit_message=f"Upload {recipe.student.kind} student {recipe.student.name} "
            f"({', '.join(recipe.export.formats)})",
        )
    except Exception as e:  # any Hub/network error: report it; nothing local was touched
        raise PushError(
            f"push: uploading {export_dir} to the model repo {repo_id} failed ({type(e).__name__}: {one_line(e)}); "
            "the local export is unchanged. Check your token (HF_TOKEN or `hf auth login`) and write access, then "
            f"rerun `python -m distill push {recipe.source or 'RECIPE.yaml'}`"
        ) from e
    return str(url)
