"""One declarative port table per model family."""
