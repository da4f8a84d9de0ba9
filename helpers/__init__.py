"""Grad-CAM confusion analysis suite: all logic behind GradCAM_Analysis.ipynb."""
