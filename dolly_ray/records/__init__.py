"""Records in: the sources and schemas a dataset is read from, validation with counted skips, the project-made tasks and hostile records. No Ray needed to read one file."""
