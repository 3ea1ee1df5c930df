"""Data the project reads and makes: image folders and their classes, class names, the
generated shapes dataset."""
