"""xpu_llm.launch: see DESIGN.md; filled in by its own issue."""
