"""Where the off-centre training cubes (every third) are lost: model.miss_diagnosis over the field
protocol's draws on training data (used to choose the candidate threshold tried in
docs/model/experiment-candidate-threshold-0.08.json). Usage: python benchmarks/field_misses_training_cubes.py OUT.json
"""
import json, sys, time, resource
import torch
torch.set_num_threads(1)
from model import data as D, miss_diagnosis as M
from model.inference import Predictor
p = Predictor(threads=1)
_, train, _ = D.split_cubes(D.load_cubes())
train = [c for c in train if c.mask.any()][::3]
t=time.time()
r = M.explain_field(p, train, seed=0, only_missed=True)
r["seconds"]=time.time()-t; r["cpu_s"]=resource.getrusage(resource.RUSAGE_SELF).ru_utime
json.dump(r, open(sys.argv[1],"w"), indent=1)
print(len(train), r["by_stage"]); print(r["by_band"]); print(r["seconds"], r["cpu_s"])
