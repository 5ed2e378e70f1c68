"""A job's images, counted as its samplers make them: the daily image quota holds what a run really makes,
not only what its graph showed at submission.

At submission the owner was charged the graph's estimate (`workflow/image_count.py`), kept in the job's
context. While the job runs each sampler says how many images it is about to make: as long as they fit
in that estimate nothing more is asked of the queue; past it, the rest is charged before the sampler
starts, and refused if the owner's day is used up (the run fails at that node, naming the quota). When
the run ends having made fewer than it was charged (a sampler that was cached, a run that failed early),
the difference is given back, to the day it was charged on.
"""

from __future__ import annotations

from zimage_serve.queue.contract import JobQueue
from zimage_serve.queue.jobs import Job


class ImageTally:
    def __init__(self, queue: JobQueue, job: Job) -> None:
        self.queue, self.job = queue, job
        self.estimate, self.allowed = job.context.images, job.context.images_per_day
        self.made = 0
        self.beyond = 0  # charged during the run, past the estimate

    def __call__(self, images: int) -> None:
        """A sampler is about to make `images`; raises QuotaExceeded if the owner may not make them."""
        missing = self.made + images - self.estimate - self.beyond
        if missing > 0:
            refused = self.queue.count_images(self.job.owner, missing, allowed=self.allowed)
            if refused is not None:
                raise refused
            self.beyond += missing
        self.made += images

    def settle(self) -> None:
        """The run ended: what was charged at submission and not made is given back."""
        unused = self.estimate - self.made
        if unused > 0:
            self.queue.count_images(self.job.owner, -unused, when=self.job.created or None)
