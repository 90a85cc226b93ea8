"""``copa serve``: a local web page that shows what a trained model sees and says (FastAPI + one page)."""

from copa.serve.app import ServeOptions, TaskModels, create_app

__all__ = ["ServeOptions", "TaskModels", "create_app"]
