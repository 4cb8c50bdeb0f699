// SPDX-License-Identifier: Apache-2.0
//
// \file titans.hpp
// \brief The one umbrella include of the titans library.
#pragma once

#include "common.hpp"
#include "parameters.hpp"
#include "memory/model.hpp"
#include "memory/kernel.hpp"
#include "neural_memory.hpp"
#include "attention.hpp"
#include "blocks.hpp"
#include "model.hpp"
#include "train/optimizer.hpp"
#include "train/gradcheck.hpp"
#include "memory/backward.hpp"

// Checkpoints need nlohmann-json (an optional dependency); define TITANS_NO_CHECKPOINT to leave
// them out even when it is installed.
#if !defined(TITANS_NO_CHECKPOINT) && __has_include(<nlohmann/json.hpp>)
#include "checkpoint.hpp"
#include "model_checkpoint.hpp"
#include "io/session.hpp"
#endif
