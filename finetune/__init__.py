"""xpu_llm.finetune: see DESIGN.md; filled in by its own issue."""
