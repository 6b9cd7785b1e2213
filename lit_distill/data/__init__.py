"""Data: embedded real digits and prompt sets, ``ImageDataModule`` and ``PromptDataModule``."""
from lit_distill.data.embedded import (
    CAPTION_TEMPLATES,
    DIGIT_WORDS,
    PROMPT_TEMPLATES,
    Split,
    caption_for,
    embedded_prompt_sets,
    embedded_vocabulary,
    load_embedded_digits,
    split_indices,
)
from lit_distill.data.images import ImageDataModule, scan_image_folder
from lit_distill.data.prompts import PromptDataModule, collate_prompts, read_prompt_file, tasks_in, write_prompt_file

__all__ = [
    "CAPTION_TEMPLATES",
    "DIGIT_WORDS",
    "PROMPT_TEMPLATES",
    "ImageDataModule",
    "PromptDataModule",
    "Split",
    "caption_for",
    "collate_prompts",
    "embedded_prompt_sets",
    "embedded_vocabulary",
    "load_embedded_digits",
    "read_prompt_file",
    "scan_image_folder",
    "split_indices",
    "tasks_in",
    "write_prompt_file",
]
