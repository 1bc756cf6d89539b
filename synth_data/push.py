"""The `push` stage: upload `<output_dir>/dataset/` to the Hub dataset repo `data.hub_repo_id`.

The token comes from the environment (HF_TOKEN) or `hf auth login`; it is never passed in, logged or written.
The upload only reads the local folder, so a failure leaves it as it was and `push` can simply be rerun
(files already on the Hub are deduplicated by the upload).
"""

from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub import HfApi

from synth_data.config import DataConfig
from synth_data.layout import WORK_DIR, is_complete

logger = logging.getLogger(__name__)


class PushError(RuntimeError):
    """The Hub refused or the upload failed; the local dataset is unchanged."""


def one_line(error: BaseException) -> str:
    """An HTTP error's message on one line (huggingface_hub's span several: status, a docs link, the server's)."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def push(data: DataConfig, teacher_name: str, out: Path) -> str:
    """Create the dataset repo if needed (private per `data.hub_private`) and upload `out/dataset/`; returns its URL.
    `teacher_name` (`teacher.pretrained`) goes into the commit message."""
    repo_id = data.hub_repo_id
    if not repo_id:
        raise ValueError(
            "data.hub_repo_id: not set; set it to a dataset repo you can write to, e.g. "
            "`python -m distill push RECIPE.yaml data.hub_repo_id=me/wan21-synth`"
        )
    dataset_dir = Path(out) / "dataset"
    if not is_complete(dataset_dir):
        raise ValueError(
            f"{dataset_dir}: not complete (no COMPLETE marker); run `python -m distill generate RECIPE` first"
        )
    api = HfApi()  # token: HF_TOKEN or the saved login, resolved by huggingface_hub itself
    try:
        url = api.create_repo(repo_id, repo_type="dataset", private=data.hub_private, exist_ok=True)
        logger.info("push: uploading %s to %s", dataset_dir, url)
        api.upload_folder(
            repo_id=repo_id,
            repo_type="dataset",
            folder_path=dataset_dir,
            commit_message=f"Upload synthetic dataset ({teacher_name}, {data.num_prompts} prompts)",
            ignore_patterns=[f"{WORK_DIR}/**", "**/.*.tmp"],
        )
    except Exception as e:  # any Hub/network error: report it, keep the local folder as is
        raise PushError(
            f"push: uploading {dataset_dir} to the dataset repo {repo_id} failed ({type(e).__name__}: {one_line(e)}); "
            "the local dataset is unchanged. Check your token (HF_TOKEN or `hf auth login`) and write access, "
            "then rerun `python -m distill push RECIPE`"
        ) from e
    return str(url)
