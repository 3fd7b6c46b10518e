"""Tools around the project (README figures, checks); run each as a module from the repository root
(``python -m scripts.NAME``)."""
