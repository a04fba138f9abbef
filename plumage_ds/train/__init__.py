"""The main job: embedded corpus (:mod:`.data`), model (:mod:`.model`), loop (:mod:`.loop`),
run comparison (:mod:`.compare`). Heavy imports stay inside the submodules."""
