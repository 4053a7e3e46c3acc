"""Continued pre-training: the SFT job on raw text (format `text`, loss on every token, packed).

Embeddings and lm_head can train too (`model.train_embeddings=true`, with `trainer.embedding_lr`).

  posttrain cpt jobs/configs/tiny-cpt.yaml data.path=corpus/*.txt output_dir=runs/cpt
  python -m jobs.cpt jobs/configs/tiny-cpt.yaml
"""
from __future__ import annotations

import sys

from jobs.sft import main as _sft_main


def main(argv: list[str] | None = None) -> int:
    return _sft_main(argv, task="cpt")


if __name__ == "__main__":
    sys.exit(main())
