"""Attempt 16: the first 40 validation relation captions at the default settings (w = 2, t/T <= 0.5); prints the
wrong ones with the evaluator's detections and writes a sheet of them to relbad.png (session 19: 10 of 40)."""

from PIL import Image, ImageDraw

from jaxdiff.eval import fidelity, study
from jaxdiff.pipelines.stable_diffusion import Pipeline

pipe = Pipeline.from_pretrained("models/shapes_sd")
caps = study.captions_of("validation", 40, "relation")
imgs = study.generate(pipe, caps, 2.0, 25, "ddim", batch=40, guidance_interval=(0, 0.5))
bad = [(c, im) for c, im in zip(caps, imgs) if not fidelity.score(im, c)["correct"]]
print(len(bad), "of", len(caps), "wrong")
sheet = Image.new("RGB", (4 * 200, ((len(bad) + 3) // 4) * 150), "white")
d = ImageDraw.Draw(sheet)
for i, (c, im) in enumerate(bad):
    x, y = (i % 4) * 200, (i // 4) * 150
    sheet.paste(Image.fromarray(im).resize((128, 128), Image.NEAREST), (x, y))
    d.text((x, y + 130), c[:34], fill="black")
    print(c, fidelity.score(im, c))
sheet.save("relbad.png")
