import { LabIcon } from '@jupyterlab/ui-components';

import gpuSvgStr from '../style/icons/gpu.svg';

/** The GPU chip of the status bar item and the "GPU pool" sidebar tab. */
export const gpuIcon = new LabIcon({
  name: 'jupyter-singularity:gpu',
  svgstr: gpuSvgStr
});
