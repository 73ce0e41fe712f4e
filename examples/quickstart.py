import torch
import torchvision

import fastcam
from fastcam.models import split_model

torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=5)  # any GAP -> Linear classifier
body, head = split_model(model)  # body(x): features before pooling; head: model.fc itself
criterion = fastcam.AttentionMapLoss(lambda_distinct=0.5, lambda_consist=0.1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

images = torch.randn(8, 3, 128, 128)
labels = (torch.rand(8, 5) < 0.3).float()  # multi-hot findings
label_mask = torch.ones(8, 5, dtype=torch.bool)
label_mask[6:] = False  # two unlabeled images: they count through the model's predictions

for step in range(3):
    features = body(images)  # [8, 512, 4, 4]
    out = criterion(features, head, labels, label_mask, return_output=True)
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    print(f"step {step}: loss {out.loss.item():.4f} = bce {out.bce.item():.4f}"
          f" + 0.5 * distinct {out.distinct.item():.4f} + 0.1 * consist {out.consist.item():.4f}")

with torch.no_grad():  # every class map at once, for display: [8, 5, 4, 4]
    logits, cams = fastcam.cam_head(body(images), head.weight, head.bias, normalize="max")
print("maps", tuple(cams.shape), "| backends:", [n for n, b in fastcam.backends().items() if b.usable])
