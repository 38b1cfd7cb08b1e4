"""Optional push of each exported model to the Hugging Face Hub.

Untested here: the Hub cannot be reached from the build machines and there is no local fake of
it, so this path is exercised only on a networked machine. The token comes from the Hub's own
chain (``HF_TOKEN`` or ``huggingface-cli login``), never from params or receipts.
"""

from __future__ import annotations

from pathlib import Path

from vaeft.console import console
from vaeft.export.release import verify_sums
from vaeft.publish.local import release_version


def publish_hub(export_dir: str | Path, repo_prefix: str, private: bool = True) -> dict[str, str]:
    """Upload ``export_dir/<model>/`` to ``<repo_prefix><model>`` and tag it with the release
    version; a version tag that already exists is left alone (the Hub's history is the record)."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HfHubHTTPError

    export_dir = Path(export_dir)
    verify_sums(export_dir)
    version = release_version(export_dir)
    api = HfApi()
    urls: dict[str, str] = {}
    for model_dir in sorted(p for p in export_dir.iterdir() if p.is_dir()):
        repo_id = f"{repo_prefix}{model_dir.name}"
        api.create_repo(repo_id, private=private, exist_ok=True)
        refs = api.list_repo_refs(repo_id)
        if any(t.name == version for t in refs.tags):
            console.print(f"hub: {repo_id}@{version} already published")
        else:
            commit = api.upload_folder(repo_id=repo_id, folder_path=model_dir,
                                       commit_message=f"vaeft release {version}")
            try:
                api.create_tag(repo_id, tag=version, revision=commit.oid)
            except HfHubHTTPError as err:  # a concurrent run tagged it first
                console.print(f"hub: tag {version} on {repo_id}: {err}")
        urls[model_dir.name] = f"https://huggingface.co/{repo_id}/tree/{version}"
    return urls
