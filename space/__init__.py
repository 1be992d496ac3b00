"""hubprune's comparison app: one prompt, several models, answers streamed side by side (Gradio)."""
