"""xpu_llm.parallel: see DESIGN.md; filled in by its own issue."""
