"""`python tests/study_hanging.py K <vggattn.study args>`: vggattn.study that stops (sleeps) once K batches are
recorded, printing STUDY_HANGING, so a test can SIGKILL it at a known point (tests/test_study_scale.py). The hook
lives here, not in the package."""

import sys
import time

from vggattn import study

if __name__ == "__main__":
    after = int(sys.argv[1])
    write = study.Records.write

    def write_then_hang(self, record):
        write(self, record)
        if self.kind == "part" and len(self.parts()) >= after:  # the study's own records (not "faith")
            print("STUDY_HANGING", flush=True)
            time.sleep(3600)

    study.Records.write = write_then_hang
    sys.exit(study.main(sys.argv[2:]))
