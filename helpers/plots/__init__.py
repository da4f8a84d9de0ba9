"""Drawing: every function takes computed values and returns a picture; nothing here runs a model or writes
a file. figures: matplotlib figures. gallery: the PIL pages (Grad-CAM galleries, label suspects).
interactive: the Plotly/HTML pages. overlay: CAMs drawn over their images. common: what these share."""
