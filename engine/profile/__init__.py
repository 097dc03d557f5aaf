"""What a step costs without a GPU, and whether a GPU machine runs ktnas right: the instruments (:mod:`.instruments`:
bytes, launches, FLOPs of code run on fake tensors), the search step's profile (:mod:`.step`) and
``ktnas doctor`` (:mod:`.doctor`)."""
