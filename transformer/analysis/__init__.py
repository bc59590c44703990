"""Analysis tools, apart from the training and inference path: the parameter
accounting of the paper's Table 3 (params.py), the study of why attention
scales its dot products by 1/sqrt(d_k) (scaling.py), and attention weights
drawn as heatmaps (attention_maps.py). Nothing in training or translation
imports them; experiments/params.py, attention_scaling.py and
attention_maps.py are their entry points.
"""
