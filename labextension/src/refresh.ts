/**
 * `run` as a function that never runs twice at once: a call while it runs returns the run in
 * flight and asks for one more run after it, so a burst of calls costs at most two runs.
 */
export function coalesce(
  run: () => Promise<void>,
  stopped: () => boolean = () => false
): () => Promise<void> {
  let running: Promise<void> | null = null;
  let again = false;
  return () => {
    if (running) {
      again = true;
      return running;
    }
    running = (async () => {
      try {
        do {
          again = false;
          await run();
        } while (again && !stopped());
      } finally {
        running = null;
      }
    })();
    return running;
  };
}
