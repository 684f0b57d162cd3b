"""Teachers: the frozen 2D editors that score distillation queries, and their building blocks."""
